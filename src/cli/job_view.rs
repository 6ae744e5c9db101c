//! How the client shows a job: one line in lists, and the whole job for `tlb jobs JOB_ID`.

use crate::proto::v1 as pb;

pub(super) fn state_name(state: i32) -> &'static str {
    pb::JobState::try_from(state).map_or("UNKNOWN", |s| {
        s.as_str_name().trim_start_matches("JOB_STATE_")
    })
}

pub(super) fn job_line(j: &pb::Job) -> String {
    let val = j
        .latest_metrics
        .as_ref()
        .map_or("-".into(), |m| format!("{:.2}%", m.val_accuracy * 100.0));
    let ran_on = if j.worker.is_empty() {
        String::new()
    } else {
        format!("  on {} {} (attempt {})", j.worker, j.device, j.attempt)
    };
    let trial = match j.trial {
        Some(n) if !j.search_id.is_empty() => format!("  trial {n} of search {}", j.search_id),
        _ => String::new(),
    };
    format!(
        "{}  {:<9}  {:<9}  epochs {}/{}  val {}{}{}{}",
        j.job_id,
        state_name(j.state),
        j.preset,
        j.epochs_completed,
        j.epochs_total,
        val,
        trial,
        ran_on,
        if j.error.is_empty() {
            String::new()
        } else {
            format!("  error: {}", j.error)
        }
    )
}

/// The whole job, a field a line: its line, then where and how it ran, its figures, its
/// warnings and error, and its config.
pub(super) fn job_detail(j: &pb::Job) -> String {
    let mut out = vec![job_line(j)];
    let mut field = |name: &str, value: String| {
        if !value.is_empty() {
            out.push(format!("  {name:<12} {value}"));
        }
    };
    field("preset", j.preset.clone());
    if let Some(d) = &j.dataset {
        let named = [&d.id, &d.uri, &d.path].into_iter().find(|s| !s.is_empty());
        field(
            "dataset",
            format!("{} ({})", named.map_or("", |s| s.as_str()), d.format),
        );
    }
    field("started by", j.created_by.clone());
    let time =
        |t: &Option<prost_types::Timestamp>| t.as_ref().map_or(String::new(), |t| t.to_string());
    field("created", time(&j.created_at));
    field("started", time(&j.started_at));
    field("finished", time(&j.finished_at));
    field(
        "epochs",
        format!("{}/{}", j.epochs_completed, j.epochs_total),
    );
    if let Some(m) = &j.latest_metrics {
        field(
            "latest",
            format!(
                "epoch {}: train loss {:.4} acc {:.2}% | val loss {:.4} acc {:.2}% | {:.0} img/s",
                m.epoch,
                m.train_loss,
                m.train_accuracy * 100.0,
                m.val_loss,
                m.val_accuracy * 100.0,
                m.images_per_sec
            ),
        );
    }
    field(
        "test",
        j.test_accuracy
            .map_or(String::new(), |t| format!("{:.2}%", t * 100.0)),
    );
    field("best ckpt", j.best_checkpoint_id.clone());
    if let Some(n) = j.trial.filter(|_| !j.search_id.is_empty()) {
        field("search", format!("{} (trial {n})", j.search_id));
    }
    if !j.worker.is_empty() {
        field(
            "ran on",
            format!(
                "{} {}, attempt {}, restarts {}",
                j.worker, j.device, j.attempt, j.restarts
            ),
        );
    }
    if j.cancel_requested {
        field("cancel", "requested".into());
    }
    for w in &j.warnings {
        field("warning", w.clone());
    }
    field("error", j.error.clone());
    let config = serde_json::from_str::<serde_json::Value>(&j.config_json)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| j.config_json.clone());
    out.push(format!("  config\n{}", indent(&config, "    ")));
    out.join("\n")
}

fn indent(text: &str, by: &str) -> String {
    text.lines()
        .map(|l| format!("{by}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
