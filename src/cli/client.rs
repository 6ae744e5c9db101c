//! Client subcommands: talk to a running `tlb serve` over gRPC.

use std::path::PathBuf;

pub use super::connect::{channel, Conn, ServerArg};
use super::job_view::{job_detail, job_line, state_name};
use crate::proto::v1 as pb;
use crate::proto::v1::inference_service_client::InferenceServiceClient;
use crate::proto::v1::training_service_client::TrainingServiceClient;
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// reference, cpu-small or tiny.
    #[arg(long, default_value = "cpu-small")]
    pub preset: String,
    /// cifar10, cifar100 or image-folder.
    #[arg(long, default_value = "cifar10")]
    pub format: String,
    /// Dataset folder relative to the server's datasets root; or a local folder or archive
    /// (a path starting with `./`, `../` or `/`): uploaded first (or found there already)
    /// and trained on as an uploaded dataset.
    #[arg(long)]
    pub dataset: String,
    #[arg(long)]
    pub epochs: Option<u32>,
    #[arg(long)]
    pub batch_size: Option<u32>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub max_minutes: Option<f64>,
    /// f32, or bf16 mixed precision (f32 parameters and optimiser state; for CUDA).
    #[arg(long)]
    pub precision: Option<crate::engine::model::Precision>,
    /// Follow the job with a progress bar until it ends.
    #[arg(long)]
    pub watch: bool,
}

#[derive(Args, Debug)]
pub struct JobsArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// Show one job in full.
    pub job_id: Option<String>,
    /// Only jobs in this state: queued, running, succeeded, failed, cancelled, paused (a
    /// search's trial waiting at its rung), stopped (one its search ended without promoting).
    #[arg(long)]
    pub state: Option<String>,
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

#[derive(Args, Debug)]
pub struct JobArg {
    #[command(flatten)]
    pub server: ServerArg,
    pub job_id: String,
}

#[derive(Args, Debug)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// PNG or JPEG files.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// A job id, a checkpoint id, or empty for the server's default model.
    #[arg(long, default_value = "")]
    pub model: String,
    #[arg(long, default_value_t = 3)]
    pub top_k: u32,
}

#[derive(Args, Debug)]
pub struct AttentionClientArgs {
    #[command(flatten)]
    pub server: ServerArg,
    pub image: PathBuf,
    #[arg(long, default_value = "overlay.png")]
    pub out: PathBuf,
    #[arg(long, default_value = "")]
    pub model: String,
    /// Side of the overlay PNG.
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    /// The image and the overlay side by side (`--side-by-side false`: the overlay alone).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub side_by_side: bool,
}

pub(super) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub(super) fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

pub fn train(a: TrainArgs) -> Result<()> {
    runtime()?.block_on(async {
        let mut client = TrainingServiceClient::new(channel(&a.server).await?);
        let config = pb::TrainingConfig {
            epochs: a.epochs,
            batch_size: a.batch_size,
            lr: a.lr,
            seed: a.seed,
            max_minutes: a.max_minutes,
            precision: match a.precision {
                None => pb::Precision::Unspecified,
                Some(crate::engine::model::Precision::F32) => pb::Precision::F32,
                Some(crate::engine::model::Precision::Bf16) => pb::Precision::Bf16,
            } as i32,
            ..Default::default()
        };
        let dataset = dataset_arg(&a.server, &a.dataset, &a.format).await?;
        let job_id = client
            .start_training(pb::StartTrainingRequest {
                preset: a.preset.clone(),
                config: Some(config),
                dataset: Some(dataset),
            })
            .await
            .map_err(status_err)?
            .into_inner()
            .job_id;
        println!("{job_id}");
        if a.watch {
            watch_job(&mut client, &job_id).await?;
        }
        Ok(())
    })
}

/// The dataset a `--dataset` names: a folder or archive here (`./x`, `../x`, `/x`), uploaded
/// first (or found there already); otherwise a folder under the server's datasets root.
pub(super) async fn dataset_arg(
    server: &ServerArg,
    dataset: &str,
    format: &str,
) -> Result<pb::Dataset> {
    let local = std::path::Path::new(dataset);
    // `./x`, `../x` or `/x`: a folder here; a bare name is the server's.
    let is_local = dataset.starts_with('.') || dataset.starts_with('/');
    if is_local && local.exists() {
        let format = if format == "cifar10" && local.is_dir() && !has_cifar(local) {
            "image-folder"
        } else {
            format
        };
        let info = super::datasets::upload(server, local, None, format).await?;
        eprintln!("dataset {} ({} images)", info.name, info.images);
        return Ok(pb::Dataset {
            id: info.name,
            ..Default::default()
        });
    }
    Ok(pb::Dataset {
        format: format.to_string(),
        path: dataset.to_string(),
        ..Default::default()
    })
}

/// Whether a local folder holds the CIFAR binary files (else it is taken for an image folder).
fn has_cifar(dir: &std::path::Path) -> bool {
    dir.join("data_batch_1.bin").exists() || dir.join("train.bin").exists()
}

pub fn watch(a: JobArg) -> Result<()> {
    runtime()?.block_on(async {
        let mut client = TrainingServiceClient::new(channel(&a.server).await?);
        watch_job(&mut client, &a.job_id).await
    })
}

/// Follows a job with a progress bar; errors when it does not succeed.
async fn watch_job(client: &mut TrainingServiceClient<Conn>, job_id: &str) -> Result<()> {
    use pb::job_event::Event;
    let mut stream = client
        .watch_job(pb::WatchJobRequest {
            job_id: job_id.to_string(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {prefix} [{bar:30}] {pos}/{len} steps {msg} (eta {eta})",
        )?
        .progress_chars("=> "),
    );
    // Without a terminal the bar is hidden, and so would be its lines.
    let say = |line: String| match bar.is_hidden() {
        true => eprintln!("{line}"),
        false => bar.println(line),
    };
    let mut last: Option<pb::Job> = None;
    while let Some(event) = stream.message().await.map_err(status_err)? {
        match event.event {
            Some(Event::State(j)) => {
                bar.set_prefix(state_name(j.state).to_lowercase());
                say(job_line(&j));
                last = Some(j);
            }
            Some(Event::Progress(p)) => {
                bar.set_length(p.total_steps);
                bar.set_position(p.global_step);
                bar.set_prefix(format!("epoch {}", p.epoch));
                bar.set_message(format!(
                    "loss {:.3} acc {:.1}% {:.0} img/s",
                    p.loss,
                    p.accuracy * 100.0,
                    p.images_per_sec
                ));
            }
            Some(Event::Epoch(m)) => say(format!(
                "epoch {:>3}: train loss {:.4} acc {:.2}% | val loss {:.4} acc {:.2}% | {:.0} img/s",
                m.epoch,
                m.train_loss,
                m.train_accuracy * 100.0,
                m.val_loss,
                m.val_accuracy * 100.0,
                m.images_per_sec
            )),
            Some(Event::Checkpoint(c)) => say(format!(
                "checkpoint {} (epoch {}{})",
                c.checkpoint_id,
                c.epoch,
                if c.best { ", best" } else { "" }
            )),
            Some(Event::Download(d)) => {
                bar.set_length(d.bytes_total.max(d.bytes_done));
                bar.set_position(d.bytes_done);
                bar.set_prefix("download");
            }
            Some(Event::Warning(w)) => say(format!("warning: {}", w.message)),
            None => {}
        }
    }
    bar.finish_and_clear();
    match last {
        Some(j) if j.state == pb::JobState::Succeeded as i32 => {
            if let Some(t) = j.test_accuracy {
                println!("test accuracy {:.2}%", t * 100.0);
            }
            Ok(())
        }
        Some(j) if j.error.is_empty() => bail!("job {} ended {}", j.job_id, state_name(j.state)),
        Some(j) => bail!(
            "job {} ended {}: {}",
            j.job_id,
            state_name(j.state),
            j.error
        ),
        None => bail!("the stream ended without a state"),
    }
}

pub fn jobs(a: JobsArgs) -> Result<()> {
    runtime()?.block_on(async {
        let mut client = TrainingServiceClient::new(channel(&a.server).await?);
        if let Some(id) = a.job_id {
            let job = client
                .get_job(pb::GetJobRequest { job_id: id })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("{}", job_detail(&job));
            return Ok(());
        }
        let state = match &a.state {
            None => pb::JobState::Unspecified,
            Some(s) => pb::JobState::from_str_name(&format!("JOB_STATE_{}", s.to_uppercase()))
                .with_context(|| format!("unknown state '{s}'"))?,
        };
        let list = client
            .list_jobs(pb::ListJobsRequest {
                state: state as i32,
                page_size: a.limit,
                page_token: String::new(),
            })
            .await
            .map_err(status_err)?
            .into_inner();
        for j in &list.jobs {
            println!("{}", job_line(j));
        }
        Ok(())
    })
}

pub fn cancel(a: JobArg) -> Result<()> {
    runtime()?.block_on(async {
        let mut client = TrainingServiceClient::new(channel(&a.server).await?);
        let job = client
            .cancel_job(pb::CancelJobRequest { job_id: a.job_id })
            .await
            .map_err(status_err)?
            .into_inner();
        println!("{}", job_line(&job));
        Ok(())
    })
}

pub fn checkpoints(a: JobArg) -> Result<()> {
    runtime()?.block_on(async {
        let mut client = TrainingServiceClient::new(channel(&a.server).await?);
        let list = client
            .list_checkpoints(pb::ListCheckpointsRequest { job_id: a.job_id })
            .await
            .map_err(status_err)?
            .into_inner();
        for c in list.checkpoints {
            println!(
                "{}  epoch {:>3}  val {}{}",
                c.checkpoint_id,
                c.epoch,
                c.val_accuracy
                    .map_or("-".into(), |v| format!("{:.2}%", v * 100.0)),
                if c.best { "  best" } else { "" }
            );
        }
        Ok(())
    })
}

pub(super) fn encoded(path: &PathBuf) -> Result<pb::Image> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(pb::Image {
        source: Some(pb::image::Source::Encoded(bytes)),
    })
}

pub fn classify(a: ClassifyArgs) -> Result<()> {
    runtime()?.block_on(async {
        let mut client = InferenceServiceClient::new(channel(&a.server).await?);
        let images = a.images.iter().map(encoded).collect::<Result<Vec<_>>>()?;
        let out = client
            .classify(pb::ClassifyRequest {
                model: a.model.clone(),
                images,
                top_k: a.top_k,
            })
            .await
            .map_err(status_err)?
            .into_inner();
        for (path, r) in a.images.iter().zip(out.results) {
            let preds: Vec<String> = r
                .predictions
                .iter()
                .map(|p| format!("{} {:.1}%", p.label, p.probability * 100.0))
                .collect();
            println!("{}: {}", path.display(), preds.join(", "));
        }
        Ok(())
    })
}

pub fn attention(a: AttentionClientArgs) -> Result<()> {
    runtime()?.block_on(async {
        let mut client = InferenceServiceClient::new(channel(&a.server).await?);
        let out = client
            .get_attention(pb::GetAttentionRequest {
                model: a.model.clone(),
                image: Some(encoded(&a.image)?),
                render_overlay: true,
                side_by_side: Some(a.side_by_side),
                overlay_size: a.size,
            })
            .await
            .map_err(status_err)?
            .into_inner();
        std::fs::write(&a.out, &out.overlay_png)
            .with_context(|| format!("writing {}", a.out.display()))?;
        let p = out.prediction.unwrap_or_default();
        println!(
            "{}: {} {:.1}% ({} chunks, {}x{} grid) -> {}",
            a.image.display(),
            p.label,
            p.probability * 100.0,
            out.num_chunks,
            out.grid_height,
            out.grid_width,
            a.out.display()
        );
        Ok(())
    })
}
