//! Runs the real `tlb serve` binary on an ephemeral port for integration tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tlb::proto::v1 as pb;
use tlb::proto::v1::inference_service_client::InferenceServiceClient;
use tlb::proto::v1::search_service_client::SearchServiceClient;
use tlb::proto::v1::training_service_client::TrainingServiceClient;
use tonic::transport::Channel;

pub struct Server {
    pub child: Child,
    pub addr: String,
    pub root: PathBuf,
}

impl Server {
    /// Starts a server on `root/data` and `root/datasets` with extra flags.
    pub fn start(root: &Path, extra: &[&str]) -> Self {
        Self::spawn(Self::command(root, extra), root)
    }

    /// The command [`Self::start`] runs, to adjust before [`Self::spawn`].
    pub fn command(root: &Path, extra: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tlb"));
        cmd.args(["serve", "--addr", "127.0.0.1:0", "--data-dir"])
            .arg(root.join("data"))
            .arg("--datasets-root")
            .arg(root.join("datasets"))
            .args(extra)
            .env("TLB_THREADS", "1")
            .env("RUST_LOG", "warn");
        cmd
    }

    /// Runs `cmd` (a `tlb serve`) and waits for its address.
    pub fn spawn(mut cmd: Command, root: &Path) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting tlb serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("tlb listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        Self {
            child,
            addr: format!("http://{addr}"),
            root: root.to_path_buf(),
        }
    }

    pub async fn channel(&self) -> Channel {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match Channel::from_shared(self.addr.clone())
                .unwrap()
                .connect()
                .await
            {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("connecting: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The overall status grpc.health.v1 reports (no token needed).
    pub async fn health(&self) -> tonic_health::pb::health_check_response::ServingStatus {
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel().await);
        let status = health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner()
            .status;
        tonic_health::pb::health_check_response::ServingStatus::try_from(status).unwrap()
    }

    /// Waits (up to 30 s) until the server reports SERVING: its device worker is up, which
    /// takes longer than its port does when other tests share the cores.
    pub async fn until_serving(&self) {
        use tonic_health::pb::health_check_response::ServingStatus;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.health().await;
            if now == ServingStatus::Serving {
                return;
            }
            assert!(Instant::now() < deadline, "still {now:?} after 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn training(&self) -> TrainingServiceClient<Channel> {
        TrainingServiceClient::new(self.channel().await)
    }

    pub async fn search(&self) -> SearchServiceClient<Channel> {
        SearchServiceClient::new(self.channel().await)
    }

    /// ListModels.
    pub async fn models(&self) -> Vec<pb::ModelInfo> {
        let mut client = self.inference().await;
        let list = client.list_models(pb::ListModelsRequest {}).await.unwrap();
        list.into_inner().models
    }

    pub async fn inference(&self) -> InferenceServiceClient<Channel> {
        InferenceServiceClient::new(self.channel().await)
            .max_encoding_message_size(usize::MAX)
            .max_decoding_message_size(usize::MAX)
    }

    /// Sends a signal (by name, e.g. "TERM" or "KILL") and waits for the process to exit.
    pub fn signal_and_wait(&mut self, signal: &str) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} failed");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit after SIG{signal}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_request(preset: &str, epochs: u32, path: &str) -> pb::StartTrainingRequest {
    pb::StartTrainingRequest {
        preset: preset.into(),
        config: Some(pb::TrainingConfig {
            epochs: Some(epochs),
            ..Default::default()
        }),
        dataset: Some(pb::Dataset {
            format: "cifar10".into(),
            path: path.into(),
            ..Default::default()
        }),
    }
}

/// Collects a job's WatchJob stream until it ends (bounded by `timeout`).
pub async fn watch_to_end(
    client: &mut TrainingServiceClient<Channel>,
    job_id: &str,
    timeout: Duration,
) -> Vec<pb::job_event::Event> {
    let mut stream = client
        .watch_job(pb::WatchJobRequest {
            job_id: job_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    let collect = async {
        while let Some(e) = stream.message().await.unwrap() {
            events.push(e.event.unwrap());
        }
    };
    tokio::time::timeout(timeout, collect)
        .await
        .expect("job did not end in time");
    events
}

/// Waits until the job's stream shows an event `pred` accepts.
pub async fn wait_for(
    client: &mut TrainingServiceClient<Channel>,
    job_id: &str,
    pred: impl Fn(&pb::job_event::Event) -> bool,
) {
    let mut stream = client
        .watch_job(pb::WatchJobRequest {
            job_id: job_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let found = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(e) = stream.message().await.unwrap() {
            if pred(e.event.as_ref().unwrap()) {
                return true;
            }
        }
        false
    })
    .await
    .expect("timed out waiting for a job event");
    assert!(found, "the job ended before the awaited event");
}

pub fn final_state(events: &[pb::job_event::Event]) -> pb::JobState {
    match events.last() {
        Some(pb::job_event::Event::State(j)) => pb::JobState::try_from(j.state).unwrap(),
        other => panic!("stream did not end with a state: {other:?}"),
    }
}

pub fn png(side: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(side, side, |x, y| {
        image::Rgb([(x * 7) as u8 ^ seed, (y * 5) as u8, seed.wrapping_mul(3)])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

pub fn encoded(bytes: Vec<u8>) -> pb::Image {
    pb::Image {
        source: Some(pb::image::Source::Encoded(bytes)),
    }
}

/// Starts a job and returns its id.
pub async fn start_job(
    client: &mut TrainingServiceClient<Channel>,
    request: pb::StartTrainingRequest,
) -> String {
    client
        .start_training(request)
        .await
        .unwrap()
        .into_inner()
        .job_id
}

pub async fn get_job(client: &mut TrainingServiceClient<Channel>, job_id: &str) -> pb::Job {
    client
        .get_job(pb::GetJobRequest {
            job_id: job_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// A job's run directory under a [`Server`]'s root (`root/data/jobs/<id>`).
pub fn job_dir(root: &Path, job: &str) -> PathBuf {
    root.join("data/jobs").join(job)
}

/// Epoch numbers in a job's `metrics.jsonl`, in file order (each once after a resume).
pub fn metric_epochs(root: &Path, job: &str) -> Vec<u64> {
    std::fs::read_to_string(job_dir(root, job).join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("epoch").and_then(|e| e.as_u64()))
        .collect()
}
