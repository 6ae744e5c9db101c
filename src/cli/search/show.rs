//! How a search looks in a terminal (its table, its events) and as a picture.

use std::path::Path;

use anyhow::Result;

use super::{client, get};
use crate::cli::client::{runtime, ServerArg};
use crate::engine::viz::{plot_search, TrialCurve};
use crate::proto::v1 as pb;

pub(super) fn search_state(state: i32) -> &'static str {
    pb::SearchState::try_from(state).map_or("UNKNOWN", |s| {
        s.as_str_name().trim_start_matches("SEARCH_STATE_")
    })
}

fn job_state(state: i32) -> &'static str {
    pb::JobState::try_from(state).map_or("UNKNOWN", |s| {
        s.as_str_name().trim_start_matches("JOB_STATE_")
    })
}

fn algorithm(a: i32) -> &'static str {
    pb::SearchAlgorithm::try_from(a).map_or("?", |a| match a {
        pb::SearchAlgorithm::Grid => "grid",
        pb::SearchAlgorithm::Asha => "asha",
        _ => "random",
    })
}

fn metric_name(s: &pb::Search) -> &'static str {
    if s.metric == pb::SearchMetric::ValLoss as i32 {
        "val_loss"
    } else {
        "val_acc"
    }
}

fn figure(s: &pb::Search, m: Option<f64>) -> String {
    match m {
        None => "-".into(),
        Some(m) if s.metric == pb::SearchMetric::ValLoss as i32 => format!("{m:.4}"),
        Some(m) => format!("{:.2}%", m * 100.0),
    }
}

pub(super) fn headline(s: &pb::Search) -> String {
    let best = match (s.best_trial, s.best_metric) {
        (Some(t), m) => format!(
            "  best: trial {t} {} at {} epochs",
            figure(s, m),
            s.best_epochs
        ),
        _ => String::new(),
    };
    format!(
        "search {}  {}  {}  trials {}/{}  epochs {}/{}{}",
        s.search_id,
        search_state(s.state),
        algorithm(s.algorithm),
        s.trials_started,
        s.trials_total,
        s.epochs_trained,
        s.epochs_budget,
        best
    )
}

/// The search's headline and, with its trials, one row per trial.
pub(super) fn table(s: &pb::Search) -> String {
    let mut out = headline(s) + "\n";
    if s.trials.is_empty() {
        return out;
    }
    out += &format!(
        "{:>5}  {:<9}  {:>4}  {:>6}  {:>9}  values\n",
        "trial",
        "state",
        "rung",
        "epochs",
        metric_name(s)
    );
    for t in &s.trials {
        let latest = t
            .reports
            .iter()
            .max_by_key(|r| r.rung)
            .and_then(|r| r.metric);
        let mark = if Some(t.trial) == s.best_trial {
            " *"
        } else {
            ""
        };
        out += &format!(
            "{:>5}  {:<9}  {:>4}  {:>6}  {:>9}  {}{}\n",
            t.trial,
            job_state(t.state),
            t.rung,
            t.epochs_completed,
            figure(s, latest),
            t.values,
            mark
        );
    }
    out
}

pub(super) fn event_line(e: &pb::SearchEvent) -> String {
    use pb::search_event::Kind;
    let trial = e.trial.map_or(String::new(), |t| format!("trial {t}"));
    match Kind::try_from(e.kind).unwrap_or(Kind::Unspecified) {
        Kind::TrialStarted => format!("{trial} started: {}", e.message),
        Kind::TrialReported => format!(
            "{trial} reported {} at epoch {}",
            e.metric.map_or("-".into(), |m| format!("{m:.4}")),
            e.epoch.unwrap_or(0)
        ),
        Kind::TrialPromoted => format!(
            "{trial} promoted to rung {} ({} epochs)",
            e.rung.unwrap_or(0),
            e.epoch.unwrap_or(0)
        ),
        Kind::TrialStopped => format!("{trial} stopped: {}", e.message),
        Kind::SearchEnded => format!("search ended: {}", e.message),
        _ => String::new(),
    }
}

/// `tlb plot --search ID`: every trial's validation curve, those promoted highlighted.
pub fn plot(server: &ServerArg, id: &str, out: &Path) -> Result<()> {
    let s = runtime()?.block_on(async { get(&mut client(server).await?, id).await })?;
    let loss = s.metric == pb::SearchMetric::ValLoss as i32;
    let curves: Vec<TrialCurve> = s
        .trials
        .iter()
        .map(|t| TrialCurve {
            trial: t.trial,
            points: t
                .epochs
                .iter()
                .map(|m| {
                    (
                        m.epoch,
                        if loss {
                            m.val_loss
                        } else {
                            m.val_accuracy * 100.0
                        },
                    )
                })
                .collect(),
            promoted: t.rung > 0,
            best: Some(t.trial) == s.best_trial,
        })
        .collect();
    let title = format!(
        "search {} ({}, {} trials)",
        &s.search_id[..8.min(s.search_id.len())],
        algorithm(s.algorithm),
        s.trials_started
    );
    let y = if loss {
        "validation loss"
    } else {
        "validation accuracy %"
    };
    plot_search(&title, y, &curves, &s.rungs, out)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
