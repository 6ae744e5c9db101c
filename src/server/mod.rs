//! `tlb serve`: the gRPC server. It opens the job store, starts the device worker, serves
//! TrainingService, InferenceService, grpc.health.v1 and reflection, and on SIGTERM/SIGINT
//! stops accepting, checkpoints the running job (it resumes on the next start) and exits.

mod endpoints;
mod health;
pub mod lock;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use clap::Args;
use tokio::sync::{broadcast, watch};
use tonic::codegen::http;
use tracing::info;

use crate::admission::Admission;
use crate::auth::{AuthLayer, Tokens};
use crate::datasets::{
    Datasets, DownloadSource, CIFAR100_MD5, CIFAR100_URL, CIFAR10_MD5, CIFAR10_URL,
};
use crate::engine::backend::DeviceSpec;
use crate::engine::train::remove_stale_temp_files;
use crate::grpc::{
    wire::RequestBytesLayer, AppState, InferenceApi, OipApi, OnlyOpenInference, TrainingApi,
    MAX_MESSAGE_BYTES,
};
use crate::metrics::RpcMetricsLayer;
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::proto::v1::inference_service_server::InferenceServiceServer;
use crate::proto::v1::training_service_server::TrainingServiceServer;
use crate::store::Store;
use crate::worker::{MissingCheckpoint, WorkerContext, WorkerHandle};
use endpoints::{reload_on_sighup, serve_metrics, tls_config};
use lock::DataDirLock;

const SERVICES: [&str; 3] = [
    "tlb.v1.TrainingService",
    "tlb.v1.InferenceService",
    "inference.GRPCInferenceService",
];

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
    /// cpu, or cuda:N in a build with the `cuda` feature. Repeat it (or separate with commas
    /// in TLB_DEVICE) for a worker per device, each running a job of its own.
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

pub fn serve(args: ServeArgs) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tlb-rpc")
        .build()?
        .block_on(serve_async(args))
}

/// tonic answers an over-limit message with OUT_OF_RANGE; gRPC's code for it is
/// RESOURCE_EXHAUSTED.
fn oversize_is_resource_exhausted<B>(mut res: http::Response<B>) -> http::Response<B> {
    let headers = res.headers();
    let oversize = headers.get("grpc-status").is_some_and(|v| v == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            // The message is percent-encoded on the wire.
            .is_some_and(|m| m.replace("%20", " ").contains("message length too large"));
    if oversize {
        res.headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    res
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => info!("SIGINT: shutting down"),
        _ = term => info!("SIGTERM: shutting down"),
    }
}

async fn serve_async(args: ServeArgs) -> Result<()> {
    crate::metrics::record_build(crate::engine::backend::BACKEND);
    if args.auth_tokens.is_none() && !args.addr.ip().is_loopback() && !args.insecure_no_auth {
        anyhow::bail!(
            "refusing to serve {} without authentication: anyone who can reach it could start \
             jobs and use the device. Give --auth-tokens FILE (see the README), listen on a \
             loopback address, or pass --insecure-no-auth to accept the risk",
            args.addr
        );
    }
    let tokens = args.auth_tokens.as_deref().map(Tokens::load).transpose()?;
    reload_on_sighup(tokens.clone())?;
    for dir in [&args.datasets_root, &args.data_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let replica_id = match &args.replica_id {
        Some(id) if id.trim().is_empty() || id.len() > 128 => {
            anyhow::bail!("--replica-id must be 1 to 128 characters")
        }
        Some(id) => id.clone(),
        None => format!("{}-{}", lock::host_name(), std::process::id()),
    };
    // With the embedded store the data dir is this server's alone: one server per data dir
    // (held until this function returns). Replicas share one through PostgreSQL and leases.
    let exclusive = args
        .database_url
        .as_deref()
        .is_none_or(|u| u.starts_with("sqlite:"));
    let _lock = exclusive
        .then(|| DataDirLock::acquire(&args.data_dir))
        .transpose()?;
    if exclusive {
        let stale = remove_stale_temp_files(&args.data_dir.join("jobs"));
        if stale > 0 {
            tracing::warn!(
                files = stale,
                "removed temp files of writes cut short by a crash"
            );
        }
    }
    let store = Store::connect_waiting(
        args.database_url.as_deref(),
        &args.data_dir,
        std::time::Duration::from_secs(args.store_wait),
    )
    .await?;
    // Jobs this server (or its last process under this id) held: resumable at once.
    let taken_back = store.expire_leases(&replica_id, exclusive).await?;
    if taken_back > 0 {
        info!(
            jobs = taken_back,
            "leases of the last run ended: their jobs resume now"
        );
    }
    let datasets = Datasets {
        root: args.datasets_root.clone(),
        allow_download: args.allow_download,
        cifar10: DownloadSource {
            url: args.cifar10_url.clone(),
            md5: args.cifar10_md5.clone(),
        },
        cifar100: DownloadSource {
            url: args.cifar100_url.clone(),
            md5: args.cifar100_md5.clone(),
        },
    };
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = health::Health::new(reporter).await;
    health.follow_store(store.watch_availability());
    let (events, _) = broadcast::channel(4096);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let stop = Arc::new(AtomicBool::new(false));
    let running = Arc::default();
    let ctx = WorkerContext {
        store: store.clone(),
        runtime: tokio::runtime::Handle::current(),
        events: events.clone(),
        datasets: datasets.clone(),
        data_dir: args.data_dir.clone(),
        running: Arc::clone(&running),
        stop: stop.clone(),
        device: args.device[0].clone(),
        device_label: args.device[0].to_string(),
        crash_loop_limit: args.crash_loop_limit,
        replica_id: replica_id.clone(),
        lease: std::time::Duration::from_secs(args.lease_seconds),
        on_missing_checkpoint: args.on_missing_checkpoint,
    };
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let worker = Arc::new(WorkerHandle::start(
        ctx,
        &args.device,
        args.inference_device.clone(),
        args.max_queued_images as usize,
        move |result| {
            let _ = ready_tx.send(result);
        },
    ));
    // SERVING once the worker owns a working device; without one the server stops.
    let (fatal_tx, fatal_rx) = tokio::sync::oneshot::channel::<String>();
    let reporter = health.clone();
    tokio::spawn(async move {
        match ready_rx.await {
            Ok(Ok(())) => reporter.device_ready().await,
            Ok(Err(why)) => {
                let _ = fatal_tx.send(why);
            }
            Err(_) => {
                let _ = fatal_tx.send("the device worker stopped while starting".into());
            }
        }
    });

    let store_for_metrics = store.clone();
    let state = AppState {
        store,
        worker: worker.clone(),
        events,
        datasets,
        data_dir: args.data_dir.clone(),
        running,
        shutdown: shutdown_rx.clone(),
        max_queued_jobs: args.max_queued_jobs as usize,
        models: Arc::new(crate::store::LastKnown::new(1024)),
        admission: Admission {
            data_dir: args.data_dir.clone(),
            min_free_bytes: args.min_free_bytes,
            device: args.device[0].clone(),
            device_memory: args.device_memory,
        },
    };
    // Each reflection version also lists the other, so `grpcurl list` shows both.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = reflection()
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let training = TrainingServiceServer::new(TrainingApi(state.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let inference = InferenceServiceServer::new(InferenceApi(state.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // The Open Inference Protocol (KServe v2) on the same port, for Triton/KServe clients.
    let open_inference = OnlyOpenInference(
        GrpcInferenceServiceServer::new(OipApi(state))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );

    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    let local = listener.local_addr()?;
    info!(addr = %local, replica = %replica_id, data_dir = %args.data_dir.display(), datasets_root = %args.datasets_root.display(), "tlb listening");
    if let Some(addr) = args.metrics_addr {
        serve_metrics(addr, store_for_metrics, shutdown_rx).await?;
    }
    // Scripts and tests read the bound address (useful with port 0) from this line.
    println!("tlb listening on {local}");

    let fatal = Arc::new(Mutex::new(None::<String>));
    let shutdown = {
        let (worker, health, fatal) = (worker.clone(), health.clone(), fatal.clone());
        async move {
            tokio::select! {
                _ = shutdown_signal() => {}
                Ok(why) = fatal_rx => {
                    *fatal.lock().expect("fatal slot") = Some(why);
                }
            }
            health.stopping().await;
            let _ = shutdown_tx.send(true);
            // The running job checkpoints now, while open calls finish.
            stop.store(true, Ordering::SeqCst);
            worker.wake();
        }
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls_config(&args)? {
        builder = builder.tls_config(tls).context("TLS settings")?;
    }
    builder
        .trace_fn(|req| tracing::info_span!("rpc", method = %req.uri().path()))
        .layer(tower::util::MapResponseLayer::new(
            oversize_is_resource_exhausted,
        ))
        .layer(RpcMetricsLayer)
        .layer(AuthLayer { tokens })
        .layer(RequestBytesLayer::new(
            usize::try_from(args.max_request_bytes_in_flight).unwrap_or(usize::MAX),
        ))
        .add_service(training)
        .add_service(inference)
        .add_service(open_inference)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(
            // No Nagle: small responses would otherwise wait for the client's delayed ACK.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    tokio::task::spawn_blocking(move || worker.stop_and_join()).await?;
    if let Some(why) = fatal.lock().expect("fatal slot").take() {
        anyhow::bail!(why);
    }
    info!("stopped");
    Ok(())
}
