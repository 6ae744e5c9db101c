//! The `tlb` command line.

mod bench;
mod client;
mod connect;
mod datasets;
mod job_view;
mod local;
mod models;
mod parity;
mod search;
mod serve_bench;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::engine::backend::DeviceSpec;
use crate::engine::data::DatasetFormat;
use crate::engine::model::{Precision, Readout};

#[derive(Parser, Debug)]
#[command(
    name = "tlb",
    version,
    about = "Train and serve the Temporal Latent Bottleneck classifier"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gRPC server (training jobs, Classify, GetAttention, health, reflection).
    Serve(Box<crate::server::ServeArgs>),
    /// Start a training job on the server (StartTraining); --watch follows it.
    Train(client::TrainArgs),
    /// List the server's jobs, or show one.
    Jobs(client::JobsArgs),
    /// Follow a job with a progress bar until it ends.
    Watch(client::JobArg),
    /// Cancel a queued, running or paused job.
    Cancel(client::JobArg),
    /// List a job's checkpoints.
    Checkpoints(client::JobArg),
    /// Classify images with a model on the server.
    Classify(client::ClassifyArgs),
    /// Fetch a per-chunk attention overlay PNG from the server.
    Attention(client::AttentionClientArgs),
    /// Hyper-parameter searches on the server: start (with a live table), watch, show, ls,
    /// cancel.
    Search(search::SearchArgs),
    /// Your own data on the server: upload a folder or archive, list, show, delete.
    Datasets(datasets::DatasetsArgs),
    /// Add a model to the server from a `tlb export` safetensors file (ImportModel).
    Import(models::ImportArgs),
    /// Classify latency and throughput through the server; prints one JSON line.
    BenchServe(serve_bench::ServeBenchArgs),
    /// Train a model offline (no server), with a progress bar and a metrics JSONL file.
    TrainLocal(TrainLocalArgs),
    /// Accuracy and loss of a checkpoint on a dataset split.
    Eval(EvalArgs),
    /// Plot loss/accuracy curves of a run as PNG, or a search's trials (--search).
    Plot(PlotArgs),
    /// Render a checkpoint's per-chunk bottleneck attention over an image as PNG.
    AttentionLocal(AttentionArgs),
    /// Export a checkpoint's weights as safetensors (PyTorch names and layouts).
    Export(ExportArgs),
    /// Measure training and inference throughput; prints one JSON line.
    Bench(BenchArgs),
    /// Compare a device's logits, gradients and optimiser steps with the CPU's.
    Parity(ParityArgs),
}

#[derive(Args, Debug)]
pub struct DataArgs {
    /// Dataset directory (CIFAR binaries or an image folder).
    #[arg(long)]
    pub data: PathBuf,
    /// Dataset format; detected from the directory when omitted.
    #[arg(long)]
    pub format: Option<DatasetFormat>,
}

#[derive(Args, Debug)]
pub struct TrainLocalArgs {
    /// Recipe to start from: reference, cpu-small or tiny.
    #[arg(long, default_value = "cpu-small")]
    pub preset: String,
    /// A JSON file with a full training config (replaces the preset).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    /// Run directory: metrics.jsonl, config.json, checkpoints/.
    #[arg(long, default_value = "runs/latest")]
    pub out: PathBuf,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub micro_batch: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Dropout for both attention and FFN.
    #[arg(long)]
    pub dropout: Option<f64>,
    #[arg(long)]
    pub readout: Option<Readout>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop after this many minutes, then validate, checkpoint and test.
    #[arg(long)]
    pub max_minutes: Option<f64>,
    /// f32, or bf16 mixed precision (f32 parameters and optimiser state; for CUDA).
    #[arg(long)]
    pub precision: Option<Precision>,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    #[arg(long, default_value = "cpu", env = "TLB_DEVICE")]
    pub device: DeviceSpec,
    /// No progress bar (for logs).
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Which split: val or test.
    #[arg(long, default_value = "test")]
    pub split: String,
    #[arg(long, default_value = "cpu", env = "TLB_DEVICE")]
    pub device: DeviceSpec,
}

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// A run directory or its metrics.jsonl.
    #[arg(long, required_unless_present = "search", conflicts_with = "search")]
    pub metrics: Option<PathBuf>,
    /// A search on the server (--server): every trial's validation curve, those promoted
    /// past their first rung highlighted.
    #[arg(long)]
    pub search: Option<String>,
    #[command(flatten)]
    pub server: client::ServerArg,
    #[arg(long, default_value = "curves.png")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct AttentionArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A PNG or JPEG image.
    #[arg(long)]
    pub image: PathBuf,
    #[arg(long, default_value = "overlay.png")]
    pub out: PathBuf,
    /// Side of the rendered overlay in pixels.
    #[arg(long, default_value_t = 384)]
    pub size: u32,
    /// The image and the overlay side by side (`--side-by-side false`: the overlay alone).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub side_by_side: bool,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long, default_value = "model.safetensors")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, default_value = "cpu-small")]
    pub preset: String,
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long, default_value = "cpu", env = "TLB_DEVICE")]
    pub device: DeviceSpec,
    /// f32, or bf16 mixed precision.
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// burn's composition of tensor operations instead of tlb's fused ones (the CPU's fused
    /// block, the wgpu kernels): the figures they are compared with.
    #[arg(long)]
    pub unfused: bool,
}

#[derive(Args, Debug)]
pub struct ParityArgs {
    #[arg(long, default_value = "reference")]
    pub preset: String,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// AdamW steps taken on both sides before the second comparison of logits.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The device checked against the CPU.
    #[arg(long, default_value = "cpu", env = "TLB_DEVICE")]
    pub device: DeviceSpec,
    /// What the device computes in (the CPU reference is f32).
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// The preset's readout unless given: last-fast or slow.
    #[arg(long)]
    pub readout: Option<Readout>,
    /// Dropout on both sides (attention and FFN). Default: the preset's where the device
    /// draws the CPU's masks (f32 on wgpu or on CUDA without fusion: tlb's kernels compute
    /// them), else none.
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Largest relative error `‖device − cpu‖ / ‖cpu‖` allowed (default: 5e-3 for f32,
    /// 0.25 for bf16).
    #[arg(long)]
    pub tolerance: Option<f64>,
    /// Print every comparison, not only those over the tolerance.
    #[arg(long)]
    pub verbose: bool,
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(a) => crate::server::serve(*a),
        Command::Train(a) => client::train(a),
        Command::Jobs(a) => client::jobs(a),
        Command::Watch(a) => client::watch(a),
        Command::Cancel(a) => client::cancel(a),
        Command::Checkpoints(a) => client::checkpoints(a),
        Command::Classify(a) => client::classify(a),
        Command::Import(a) => models::import(a),
        Command::Search(a) => search::run(a),
        Command::Datasets(a) => datasets::datasets(a),
        Command::Attention(a) => client::attention(a),
        Command::BenchServe(a) => serve_bench::serve_bench(a),
        Command::TrainLocal(a) => local::train_local(a),
        Command::Eval(a) => local::eval(a),
        Command::Plot(a) => local::plot(a),
        Command::AttentionLocal(a) => local::attention(a),
        Command::Export(a) => local::export(a),
        Command::Bench(a) => bench::bench(a),
        Command::Parity(a) => parity::parity(a),
    }
}
