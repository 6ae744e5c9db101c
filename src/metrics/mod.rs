//! Prometheus metrics: one registry for the process, a tower layer that counts and times every
//! RPC, and the `GET /metrics` endpoint (`--metrics-addr`). Names follow the Prometheus
//! conventions: base units, `_seconds`, `_total` on counters.

use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tonic::codegen::http;

/// Every metric tlb exports.
pub struct Metrics {
    pub registry: Registry,
    pub rpc_requests: IntCounterVec,
    pub rpc_duration: HistogramVec,
    pub inference_queue_seconds: Histogram,
    pub inference_dropped: IntCounterVec,
    pub inference_batch_images: Histogram,
    pub inference_queued_images: IntGauge,
    pub jobs: IntGaugeVec,
    pub train_images_per_second: prometheus::GaugeVec,
    pub device_busy_seconds: prometheus::CounterVec,
    pub checkpoint_write_seconds: Histogram,
    pub store_up: IntGauge,
    /// `tlb_build_info{version,backend}`: set by [`record_build`].
    build_info: IntGaugeVec,
    pub restarts_from_scratch: prometheus::IntCounter,
    pub search_trials: IntGaugeVec,
    pub search_promotions: prometheus::IntCounter,
}

fn build() -> prometheus::Result<Metrics> {
    let registry = Registry::new();
    let latency = exponential_buckets(0.0005, 2.0, 18)?; // 0.5 ms … 65 s
    let m = Metrics {
        rpc_requests: IntCounterVec::new(
            Opts::new(
                "tlb_rpc_requests_total",
                "gRPC calls answered, by method and status code",
            ),
            &["method", "code"],
        )?,
        rpc_duration: HistogramVec::new(
            HistogramOpts::new(
                "tlb_rpc_duration_seconds",
                "Time from a call's arrival to its response headers (streams: to their start)",
            )
            .buckets(latency.clone()),
            &["method"],
        )?,
        inference_queue_seconds: Histogram::with_opts(
            HistogramOpts::new(
                "tlb_inference_queue_seconds",
                "Time an inference request waited for the device",
            )
            .buckets(latency),
        )?,
        inference_dropped: IntCounterVec::new(
            Opts::new(
                "tlb_inference_dropped_total",
                "Inference requests dropped unprocessed when the device reached them: the \
                 caller was gone (cancelled) or its deadline had passed (deadline)",
            ),
            &["reason"],
        )?,
        inference_batch_images: Histogram::with_opts(
            HistogramOpts::new(
                "tlb_inference_batch_images",
                "Images in one forward pass of batched inference requests",
            )
            .buckets(exponential_buckets(1.0, 2.0, 11)?),
        )?,
        inference_queued_images: IntGauge::new(
            "tlb_inference_queued_images",
            "Images accepted for inference and not yet answered (bounded by --max-queued-images)",
        )?,
        jobs: IntGaugeVec::new(
            Opts::new("tlb_jobs", "Training jobs in the store, by state"),
            &["state"],
        )?,
        train_images_per_second: prometheus::GaugeVec::new(
            Opts::new(
                "tlb_train_images_per_second",
                "Training throughput of the running job (last progress report)",
            ),
            &["device"],
        )?,
        device_busy_seconds: prometheus::CounterVec::new(
            Opts::new(
                "tlb_device_busy_seconds_total",
                "Time the device worker spent training or answering inference",
            ),
            &["device", "work"],
        )?,
        checkpoint_write_seconds: Histogram::with_opts(
            HistogramOpts::new(
                "tlb_checkpoint_write_seconds",
                "Time to write one checkpoint file (serialise, write, fsync, rename)",
            )
            .buckets(exponential_buckets(0.001, 2.0, 16)?),
        )?,
        store_up: IntGauge::new(
            "tlb_store_up",
            "1 while the job store answers its probe (every second), 0 while it cannot be reached",
        )?,
        restarts_from_scratch: prometheus::IntCounter::new(
            "tlb_job_restarts_from_scratch_total",
            "Resumed jobs whose committed checkpoints were missing and that started again at \
             epoch 0 (--on-missing-checkpoint restart)",
        )?,
        search_trials: IntGaugeVec::new(
            Opts::new(
                "tlb_search_trials",
                "Trials of hyper-parameter searches in the store, by job state",
            ),
            &["state"],
        )?,
        search_promotions: prometheus::IntCounter::new(
            "tlb_search_promotions_total",
            "ASHA promotions this replica decided (trials sent on to their next rung)",
        )?,
        build_info: IntGaugeVec::new(
            Opts::new("tlb_build_info", "The running build: always 1"),
            &["version", "backend"],
        )?,
        registry,
    };
    let r = &m.registry;
    r.register(Box::new(m.rpc_requests.clone()))?;
    r.register(Box::new(m.rpc_duration.clone()))?;
    r.register(Box::new(m.inference_queue_seconds.clone()))?;
    r.register(Box::new(m.inference_dropped.clone()))?;
    r.register(Box::new(m.inference_batch_images.clone()))?;
    r.register(Box::new(m.inference_queued_images.clone()))?;
    r.register(Box::new(m.jobs.clone()))?;
    r.register(Box::new(m.train_images_per_second.clone()))?;
    r.register(Box::new(m.device_busy_seconds.clone()))?;
    r.register(Box::new(m.checkpoint_write_seconds.clone()))?;
    r.register(Box::new(m.store_up.clone()))?;
    r.register(Box::new(m.restarts_from_scratch.clone()))?;
    r.register(Box::new(m.build_info.clone()))?;
    r.register(Box::new(m.search_trials.clone()))?;
    r.register(Box::new(m.search_promotions.clone()))?;
    r.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(m)
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| build().expect("metric definitions"));

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Records the running build's version and backends (`tlb_build_info`); the caller names the
/// backends, so that this bottom layer knows nothing of the engine.
pub fn record_build(backend: &str) {
    metrics()
        .build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION"), backend])
        .set(1);
}

/// The registry in the Prometheus text format.
pub fn render() -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&metrics().registry.gather(), &mut out)
        .expect("text encoding");
    String::from_utf8(out).expect("UTF-8 metrics")
}

/// The `method` label of a request path: the service and method, or `unknown` for paths of
/// no service this server has (a bounded label set whatever clients send).
fn method_label(path: &str) -> String {
    const SERVICES: [&str; 6] = [
        "/tlb.v1.TrainingService/",
        "/tlb.v1.InferenceService/",
        "/inference.GRPCInferenceService/",
        "/grpc.health.v1.Health/",
        "/grpc.reflection.v1.ServerReflection/",
        "/grpc.reflection.v1alpha.ServerReflection/",
    ];
    let known = SERVICES.iter().any(|s| {
        path.strip_prefix(s)
            .is_some_and(|m| !m.is_empty() && m.len() <= 64 && m.chars().all(char::is_alphanumeric))
    });
    if known {
        path[1..].to_string()
    } else {
        "unknown".into()
    }
}

/// Counts and times every call (outermost layer: refused calls count too).
#[derive(Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics { inner }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let method = method_label(req.uri().path());
        let started = Instant::now();
        let future = self.inner.call(req);
        Box::pin(async move {
            let result = future.await;
            let m = metrics();
            m.rpc_duration
                .with_label_values(&[&method])
                .observe(started.elapsed().as_secs_f64());
            // A status in the headers (an immediate answer) or none yet (a response or stream
            // under way: OK so far).
            let code = match &result {
                Ok(res) => res
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32),
                Err(_) => tonic::Code::Internal,
            };
            m.rpc_requests
                .with_label_values(&[&method, &format!("{code:?}")])
                .inc();
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(
            method_label("/tlb.v1.InferenceService/Classify"),
            "tlb.v1.InferenceService/Classify"
        );
        assert_eq!(
            method_label("/inference.GRPCInferenceService/ModelInfer"),
            "inference.GRPCInferenceService/ModelInfer"
        );
        assert_eq!(method_label("/tlb.v1.InferenceService/"), "unknown");
        assert_eq!(method_label("/evil/x"), "unknown");
        assert_eq!(method_label("/tlb.v1.TrainingService/a%20b"), "unknown");
    }

    #[test]
    fn the_text_format_has_the_documented_names() {
        metrics().inference_queued_images.set(0);
        record_build("flex");
        let text = render();
        for name in [
            "tlb_build_info{backend=\"flex\",",
            "tlb_inference_queued_images 0",
            "tlb_search_promotions_total",
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
