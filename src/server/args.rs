//! The flags of `tlb serve` (each with its environment variable).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use crate::datasets::{CIFAR100_MD5, CIFAR100_URL, CIFAR10_MD5, CIFAR10_URL};
use crate::engine::backend::DeviceSpec;
use crate::grpc::MAX_MESSAGE_BYTES;
use crate::worker::MissingCheckpoint;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free one; the bound address is printed).
    #[arg(long, env = "TLB_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: SocketAddr,
    /// The job store: `postgres://USER:PASSWORD@HOST/DB` (PostgreSQL 13 or newer) or
    /// `sqlite://PATH`. Unset: SQLite in `<data-dir>/tlb.db`.
    #[arg(long, env = "TLB_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Job database (tlb.db) and job run directories with their checkpoints.
    #[arg(long, env = "TLB_DATA_DIR", default_value = "./tlb-data")]
    pub data_dir: PathBuf,
    /// Dataset paths in StartTraining are relative to this folder and may not leave it.
    #[arg(long, env = "TLB_DATASETS_ROOT", default_value = "./datasets")]
    pub datasets_root: PathBuf,
    /// cpu; cuda:N in a build with the `cuda` feature; wgpu, wgpu:N, wgpu:integrated:N or
    /// wgpu:cpu in a build with the `wgpu` feature. Repeat it (or separate with commas in
    /// TLB_DEVICE) for a worker per device, each running a job of its own.
    #[arg(long, env = "TLB_DEVICE", default_value = "cpu", value_delimiter = ',')]
    pub device: Vec<DeviceSpec>,
    /// This replica's name in the job store (Job.worker): unique among the replicas sharing a
    /// database. A replica started again under the same id takes its jobs back at once.
    /// Unset: host name and process id.
    #[arg(long, env = "TLB_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// How long a claimed job stays this replica's without renewal (renewed every third of
    /// it, timed by the database's clock); a replica that dies loses its jobs after it.
    #[arg(long, env = "TLB_LEASE_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub lease_seconds: u64,
    /// Answer Classify/GetAttention on this device from a thread of their own, even during a
    /// training step (e.g. `cpu` beside a GPU). Unset: the device worker answers them
    /// between training steps.
    #[arg(long, env = "TLB_INFERENCE_DEVICE")]
    pub inference_device: Option<DeviceSpec>,
    /// Download CIFAR-10/100 archives that are missing under the datasets root.
    #[arg(long, env = "TLB_ALLOW_DOWNLOAD", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_download: bool,
    /// Where the CIFAR-10 archive is downloaded from (a mirror may be named).
    #[arg(long, env = "TLB_CIFAR10_URL", default_value = CIFAR10_URL)]
    pub cifar10_url: String,
    /// MD5 the CIFAR-10 archive must have.
    #[arg(long, env = "TLB_CIFAR10_MD5", default_value = CIFAR10_MD5)]
    pub cifar10_md5: String,
    #[arg(long, env = "TLB_CIFAR100_URL", default_value = CIFAR100_URL)]
    pub cifar100_url: String,
    #[arg(long, env = "TLB_CIFAR100_MD5", default_value = CIFAR100_MD5)]
    pub cifar100_md5: String,
    /// Free bytes the data dir must keep besides a new job's checkpoints; StartTraining is
    /// refused (RESOURCE_EXHAUSTED) below it.
    #[arg(long, env = "TLB_MIN_FREE_BYTES", default_value_t = 64 << 20)]
    pub min_free_bytes: u64,
    /// Bearer tokens and their roles: one `ROLE NAME SECRET` per line (SECRET: the token or
    /// `sha256:HEX`); SIGHUP reloads it. Unset: no authentication (loopback only).
    #[arg(long, env = "TLB_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,
    /// Serve a non-loopback --addr without --auth-tokens (anyone who reaches the port may then
    /// start jobs and use the device).
    #[arg(long, env = "TLB_INSECURE_NO_AUTH", value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure_no_auth: bool,
    /// Serve the HTTP face on ADDR (e.g. 127.0.0.1:8080): the dashboard at `/`, tlb.v1 as
    /// JSON under `/v1`, the Open Inference Protocol's REST binding under `/v2`, an open
    /// `/healthz`; with the gRPC port's TLS settings and tokens. Unset: off.
    #[arg(long, env = "TLB_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464). Unset: off.
    #[arg(long, env = "TLB_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Images accepted for inference but not yet answered; beyond it requests are refused at
    /// once (RESOURCE_EXHAUSTED).
    #[arg(long, env = "TLB_MAX_QUEUED_IMAGES", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_queued_images: u64,
    /// Bytes of large request bodies being received at once, all callers together (the
    /// first MiB of each body is not counted); a request beyond it is refused at once
    /// (RESOURCE_EXHAUSTED) as soon as its message header declares its length. At least the
    /// largest message, 64 MiB; the default admits two such messages at once.
    #[arg(long, env = "TLB_MAX_REQUEST_BYTES_IN_FLIGHT", default_value_t = 128 << 20, value_parser = clap::value_parser!(u64).range(MAX_MESSAGE_BYTES as u64..))]
    pub max_request_bytes_in_flight: u64,
    /// How long a server started before its job store keeps trying to reach it (with
    /// backoff, 1 s doubling to 30 s) before it exits. 0: one try.
    #[arg(long, env = "TLB_STORE_WAIT", default_value_t = 120)]
    pub store_wait: u64,
    /// A resumed job whose committed checkpoints are all missing (deleted, or not visible
    /// to this replica): `fail` it, naming the files, or `restart` it from epoch 0 with a
    /// warning.
    #[arg(long, env = "TLB_ON_MISSING_CHECKPOINT", value_enum, default_value_t = MissingCheckpoint::Fail)]
    pub on_missing_checkpoint: MissingCheckpoint,
    #[command(flatten)]
    pub artifacts: crate::artifacts::ArtifactArgs,
    #[command(flatten)]
    pub uploads: crate::datasets::upload::UploadArgs,
    /// Queued training jobs; StartTraining is refused beyond it (RESOURCE_EXHAUSTED).
    #[arg(long, env = "TLB_MAX_QUEUED_JOBS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_queued_jobs: u64,
    /// TLS certificate chain (PEM); with --tls-key, the server speaks only TLS.
    #[arg(long, env = "TLB_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "TLB_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must be signed by: mutual TLS.
    #[arg(long, env = "TLB_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Memory of the training device in bytes, for StartTraining's estimate of what a job
    /// needs. Unset: the CPU's is read from the system (RAM, cgroup, ulimit -v); a GPU's is not
    /// checked (burn 0.21 cannot query it), so set this to its memory there.
    #[arg(long, env = "TLB_DEVICE_MEMORY")]
    pub device_memory: Option<u64>,
    /// A job the server died running this many times in a row (no checkpoint in between) is
    /// marked FAILED instead of resumed again.
    #[arg(long, env = "TLB_CRASH_LOOP_LIMIT", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub crash_loop_limit: u32,
}
