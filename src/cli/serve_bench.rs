//! `tlb bench-serve`: Classify latency and throughput through a running server.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;

use super::client::{channel, encoded, runtime, status_err, ServerArg};
use crate::proto::v1 as pb;
use crate::proto::v1::inference_service_client::InferenceServiceClient;

#[derive(Args, Debug)]
pub struct ServeBenchArgs {
    #[command(flatten)]
    pub server: ServerArg,
    #[arg(long, default_value = "")]
    pub model: String,
    /// A PNG or JPEG to send (every image of a batch is this one).
    #[arg(long)]
    pub image: PathBuf,
    /// Images per Classify request.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Requests to time (after 3 warm-up requests).
    #[arg(long, default_value_t = 100)]
    pub requests: usize,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Classify latency and throughput through gRPC; prints one JSON line.
pub fn serve_bench(a: ServeBenchArgs) -> Result<()> {
    runtime()?.block_on(async {
        let mut client = InferenceServiceClient::new(channel(&a.server).await?)
            .max_encoding_message_size(64 << 20);
        let image = encoded(&a.image)?;
        let request = pb::ClassifyRequest {
            model: a.model.clone(),
            images: vec![image; a.batch],
            top_k: 1,
        };
        for _ in 0..3 {
            client.classify(request.clone()).await.map_err(status_err)?;
        }
        let mut times = Vec::with_capacity(a.requests);
        let start = Instant::now();
        for _ in 0..a.requests {
            let t = Instant::now();
            client.classify(request.clone()).await.map_err(status_err)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let total = start.elapsed();
        times.sort_by(f64::total_cmp);
        println!(
            "{}",
            serde_json::json!({
                "batch": a.batch, "requests": a.requests,
                "p50_ms": percentile(&times, 0.5), "p99_ms": percentile(&times, 0.99),
                "max_ms": times.last(),
                "images_per_sec": (a.batch * a.requests) as f64 / total.as_secs_f64().max(1e-9),
            })
        );
        Ok(())
    })
}
