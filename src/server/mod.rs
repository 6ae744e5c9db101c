//! `tlb serve`: the gRPC server. It opens the job store, starts the device worker, serves
//! TrainingService, InferenceService, grpc.health.v1 and reflection, and on SIGTERM/SIGINT
//! stops accepting, checkpoints the running job (it resumes on the next start) and exits.

mod args;
mod datasets;
mod endpoints;
mod health;
pub mod lock;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::sync::{broadcast, watch};
use tonic::codegen::http;
use tracing::{info, warn};

use crate::admission::Admission;
use crate::artifacts::Artifacts;
use crate::auth::{AuthLayer, Tokens};
use crate::engine::train::remove_stale_temp_files;
use crate::grpc::{
    wire::RequestBytesLayer, AppState, DatasetApi, InferenceApi, OipApi, OnlyOpenInference,
    SearchApi, TrainingApi, MAX_MESSAGE_BYTES,
};
use crate::http::GrpcStack;
use crate::metrics::RpcMetricsLayer;
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::proto::v1::dataset_service_server::DatasetServiceServer;
use crate::proto::v1::inference_service_server::InferenceServiceServer;
use crate::proto::v1::search_service_server::SearchServiceServer;
use crate::proto::v1::training_service_server::TrainingServiceServer;
use crate::store::Store;
use crate::worker::{WorkerContext, WorkerHandle};
use endpoints::{reload_on_sighup, serve_http, serve_metrics, tls_config};
use lock::DataDirLock;

pub use args::ServeArgs;

const SERVICES: [&str; 3] = [
    "tlb.v1.TrainingService",
    "tlb.v1.InferenceService",
    "inference.GRPCInferenceService",
];

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
    crate::metrics::record_build(&crate::engine::backend::backend_name());
    let tokens = authentication(&args)?;
    let replica_id = replica_id(&args)?;
    for dir in [&args.datasets_root, &args.data_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // With the embedded store the data dir is this server's alone: one server per data dir
    // (held until this function returns). Replicas share one through PostgreSQL and leases.
    let exclusive = args
        .database_url
        .as_deref()
        .is_none_or(|u| u.starts_with("sqlite:"));
    let _lock = exclusive
        .then(|| DataDirLock::acquire(&args.data_dir))
        .transpose()?;
    let store = open_store(&args, &replica_id, exclusive).await?;
    let artifacts = open_artifacts(&args).await?;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = health::Health::new(reporter).await;
    health.follow_store(store.watch_availability());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let stop = Arc::new(AtomicBool::new(false));
    let (state, fatal_rx) = start_worker(
        &args,
        store,
        artifacts,
        replica_id.clone(),
        &health,
        shutdown_rx,
        &stop,
    );
    let worker = state.worker.clone();
    let services = services(state.clone())?;
    // Searches advance from any replica (their trials end on any).
    crate::worker::search::spawn_sweeper(state.store.clone(), state.shutdown.clone());

    // One stack for the gRPC port and the HTTP face: tokens, roles, metrics, limits.
    let layers = tower::ServiceBuilder::new()
        .layer(tower::util::MapResponseLayer::new(
            oversize_is_resource_exhausted as fn(_) -> _,
        ))
        .layer(RpcMetricsLayer)
        .layer(AuthLayer {
            tokens: tokens.clone(),
        })
        .layer(RequestBytesLayer::new(
            usize::try_from(args.max_request_bytes_in_flight).unwrap_or(usize::MAX),
        ));
    let routes = services.routes(health_service);
    let grpc = GrpcStack::new(layers.service(routes.clone()));
    serve_http(&args, grpc, tokens, state.shutdown.clone()).await?;

    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    let local = listener.local_addr()?;
    info!(addr = %local, replica = %replica_id, data_dir = %args.data_dir.display(), datasets_root = %args.datasets_root.display(), "tlb listening");
    if let Some(addr) = args.metrics_addr {
        serve_metrics(addr, state.store.clone(), state.shutdown.clone()).await?;
    }
    // Scripts and tests read the bound address (useful with port 0) from this line.
    println!("tlb listening on {local}");

    let fatal = Arc::new(Mutex::new(None::<String>));
    let shutdown = stopping(
        fatal_rx,
        fatal.clone(),
        health.clone(),
        shutdown_tx,
        stop,
        worker.clone(),
    );
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls_config(&args)? {
        builder = builder.tls_config(tls).context("TLS settings")?;
    }
    builder
        .trace_fn(|req| tracing::info_span!("rpc", method = %req.uri().path()))
        .layer(layers)
        .add_routes(routes)
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

/// Resolves on SIGTERM/SIGINT, or when no device could be used (the reason goes to `fatal`),
/// after starting the stop: health NOT_SERVING, open streams told, the running job
/// checkpointing while open calls finish.
async fn stopping(
    fatal_rx: tokio::sync::oneshot::Receiver<String>,
    fatal: Arc<Mutex<Option<String>>>,
    health: health::Health,
    shutdown_tx: watch::Sender<bool>,
    stop: Arc<AtomicBool>,
    worker: Arc<WorkerHandle>,
) {
    tokio::select! {
        _ = shutdown_signal() => {}
        Ok(why) = fatal_rx => {
            *fatal.lock().expect("fatal slot") = Some(why);
        }
    }
    health.stopping().await;
    let _ = shutdown_tx.send(true);
    stop.store(true, Ordering::SeqCst);
    worker.wake();
}

/// The token table (reloaded on SIGHUP), after the loopback rule: no tokens only on a
/// loopback address unless the operator accepts the risk.
fn authentication(args: &ServeArgs) -> Result<Option<Tokens>> {
    let exposed = std::iter::once(args.addr)
        .chain(args.http_addr)
        .find(|a| !a.ip().is_loopback());
    if let (None, Some(addr), false) = (&args.auth_tokens, exposed, args.insecure_no_auth) {
        anyhow::bail!(
            "refusing to serve {addr} without authentication: anyone who can reach it could \
             start jobs and use the device. Give --auth-tokens FILE (see the README), listen on \
             a loopback address, or pass --insecure-no-auth to accept the risk"
        );
    }
    let tokens = args.auth_tokens.as_deref().map(Tokens::load).transpose()?;
    reload_on_sighup(tokens.clone())?;
    Ok(tokens)
}

/// This replica's name in the job store.
fn replica_id(args: &ServeArgs) -> Result<String> {
    match &args.replica_id {
        Some(id) if id.trim().is_empty() || id.len() > 128 => {
            anyhow::bail!("--replica-id must be 1 to 128 characters")
        }
        Some(id) => Ok(id.clone()),
        None => Ok(format!(
            "{}-{}",
            crate::host::host_name(),
            std::process::id()
        )),
    }
}

/// Opens the job store (waiting for it, `--store-wait`) and takes back the jobs this replica
/// held; with the data dir its own (`exclusive`), first removes the temp files of writes a
/// crash cut short.
async fn open_store(args: &ServeArgs, replica_id: &str, exclusive: bool) -> Result<Store> {
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
    let taken_back = store.expire_leases(replica_id, exclusive).await?;
    if taken_back > 0 {
        info!(
            jobs = taken_back,
            replica = replica_id,
            "leases of the last run ended: their jobs resume now"
        );
    }
    Ok(store)
}

/// The artifact store `--artifact-store` names. One that cannot be reached yet is reported,
/// not fatal: StartTraining refuses jobs until it answers, and models already here serve.
async fn open_artifacts(args: &ServeArgs) -> Result<Artifacts> {
    let artifacts = Artifacts::open(&args.artifacts, &args.data_dir)?;
    if artifacts.is_remote() {
        match artifacts.check().await {
            Ok(()) => info!(store = %artifacts.describe(), "artifact store reachable"),
            Err(e) => warn!(error = %e, "artifact store not usable yet"),
        }
    }
    Ok(artifacts)
}

/// Starts the device workers and returns what the services share, and the reason the
/// server must stop if no device can be used. Health turns SERVING once a device works.
fn start_worker(
    args: &ServeArgs,
    store: Store,
    artifacts: Artifacts,
    replica_id: String,
    health: &health::Health,
    shutdown: watch::Receiver<bool>,
    stop: &Arc<AtomicBool>,
) -> (AppState, tokio::sync::oneshot::Receiver<String>) {
    let (events, _) = broadcast::channel(4096);
    let running = Arc::default();
    let datasets = datasets::datasets(args);
    datasets::sweep_uploads(datasets.uploads.clone());
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
        replica_id,
        lease: std::time::Duration::from_secs(args.lease_seconds),
        on_missing_checkpoint: args.on_missing_checkpoint,
        artifacts: artifacts.clone(),
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
    let state = AppState {
        store,
        worker,
        events,
        datasets,
        data_dir: args.data_dir.clone(),
        running,
        shutdown,
        max_queued_jobs: args.max_queued_jobs as usize,
        models: Arc::new(crate::store::LastKnown::new(1024)),
        artifacts,
        admission: Admission {
            data_dir: args.data_dir.clone(),
            min_free_bytes: args.min_free_bytes,
            device: args.device[0].clone(),
            device_memory: args.device_memory,
        },
    };
    (state, fatal_rx)
}

/// The gRPC services besides health, over one shared state.
struct Services<R1, R2> {
    training: TrainingServiceServer<TrainingApi>,
    search: SearchServiceServer<SearchApi>,
    inference: InferenceServiceServer<InferenceApi>,
    datasets: DatasetServiceServer<DatasetApi>,
    open_inference: OnlyOpenInference<GrpcInferenceServiceServer<OipApi>>,
    reflection_v1: tonic_reflection::server::v1::ServerReflectionServer<R1>,
    reflection_v1alpha: tonic_reflection::server::v1alpha::ServerReflectionServer<R2>,
}

impl<R1, R2> Services<R1, R2>
where
    R1: tonic_reflection::server::v1::ServerReflection,
    R2: tonic_reflection::server::v1alpha::ServerReflection,
{
    /// Every service, health included, as one set of routes.
    fn routes(
        self,
        health: tonic_health::pb::health_server::HealthServer<
            impl tonic_health::pb::health_server::Health,
        >,
    ) -> tonic::service::Routes {
        let mut routes = tonic::service::Routes::builder();
        routes
            .add_service(self.training)
            .add_service(self.search)
            .add_service(self.inference)
            .add_service(self.datasets)
            .add_service(self.open_inference)
            .add_service(health)
            .add_service(self.reflection_v1)
            .add_service(self.reflection_v1alpha);
        routes.routes()
    }
}

fn services(
    state: AppState,
) -> Result<
    Services<
        impl tonic_reflection::server::v1::ServerReflection,
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
> {
    // Each reflection version also lists the other, so `grpcurl list` shows both.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok(Services {
        training: TrainingServiceServer::new(TrainingApi(state.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        search: SearchServiceServer::new(SearchApi(state.clone())),
        inference: InferenceServiceServer::new(InferenceApi(state.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        datasets: DatasetServiceServer::new(DatasetApi(state.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        // The Open Inference Protocol (KServe v2) on the same port, for Triton/KServe clients.
        open_inference: OnlyOpenInference(
            GrpcInferenceServiceServer::new(OipApi(state))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        ),
        reflection_v1: reflection()
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .build_v1()?,
        reflection_v1alpha: reflection()
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?,
    })
}
