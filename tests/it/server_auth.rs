//! Tokens, roles and TLS on the real server: every RPC group for every role, job ownership,
//! SIGHUP reloads, the loopback rule, and TLS/mTLS with the `tlb` client.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::server::{start_request, Server};
use common::write_synthetic_cifar;
use tlb::proto::v1 as pb;
use tlb::proto::v1::inference_service_client::InferenceServiceClient;
use tlb::proto::v1::training_service_client::TrainingServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

const ADMIN: &str = "admin-token-0123456789";
const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789ab";
const VIEWER: &str = "viewer-token-012345678";

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn token_file(dir: &Path, viewer: &str) -> std::path::PathBuf {
    let path = dir.join("tokens");
    std::fs::write(
        &path,
        format!(
            "# role name secret\nadmin root {ADMIN}\ntrain alice sha256:{}\ntrain bob {BOB}\n\
             infer viewer {viewer}  # dashboards\n",
            sha256_hex(ALICE)
        ),
    )
    .unwrap();
    path
}

/// Puts a bearer token on every call.
#[derive(Clone)]
struct Token(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

type Auth = InterceptedService<Channel, Token>;

fn with_token(channel: Channel, token: Option<&str>) -> Auth {
    let value = token.map(|t| format!("Bearer {t}").parse().unwrap());
    InterceptedService::new(channel, Token(value))
}

async fn training(server: &Server, token: Option<&str>) -> TrainingServiceClient<Auth> {
    TrainingServiceClient::new(with_token(server.channel().await, token))
}

async fn inference(server: &Server, token: Option<&str>) -> InferenceServiceClient<Auth> {
    InferenceServiceClient::new(with_token(server.channel().await, token))
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_what_each_token_may_do() {
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_cifar(&dir.path().join("datasets/synth"), 200, 50);
    let tokens = token_file(dir.path(), VIEWER);
    let mut server = Server::start(
        dir.path(),
        &[
            "--auth-tokens",
            tokens.to_str().unwrap(),
            "--allow-download",
            "--cifar10-url",
            "http://127.0.0.1:9/none.tar.gz",
        ],
    );
    // Health is open (no token): it reports SERVING once the device worker is up.
    server.until_serving().await;
    // No token, a wrong one, a malformed header.
    for token in [None, Some("not-a-token-at-all-000")] {
        let (c, m) = code(
            training(&server, token)
                .await
                .list_jobs(pb::ListJobsRequest::default())
                .await,
        );
        assert_eq!(c, Code::Unauthenticated, "{m}");
    }
    let (c, m) = code(
        inference(&server, None)
            .await
            .list_models(pb::ListModelsRequest {})
            .await,
    );
    assert_eq!(c, Code::Unauthenticated, "{m}");

    // infer: reads and inference, not training.
    let mut viewer = training(&server, Some(VIEWER)).await;
    let (c, m) = code(
        viewer
            .start_training(start_request("tiny", 1, "synth"))
            .await,
    );
    assert_eq!(c, Code::PermissionDenied);
    assert!(m.contains("StartTraining needs role train or admin"), "{m}");
    assert!(m.contains("'viewer' has role infer"), "{m}");
    assert_eq!(
        code(viewer.list_jobs(pb::ListJobsRequest::default()).await).0,
        Code::Ok
    );
    let (c, m) = code(
        inference(&server, Some(VIEWER))
            .await
            .classify(pb::ClassifyRequest {
                model: String::new(),
                images: vec![common::server::encoded(common::server::png(8, 1))],
                top_k: 1,
            })
            .await,
    );
    assert_eq!(c, Code::FailedPrecondition, "reaches the service: {m}");

    // train: starts jobs recorded as its own, cancels only those.
    let mut alice = training(&server, Some(ALICE)).await;
    let mut bob = training(&server, Some(BOB)).await;
    let job = alice
        .start_training(start_request("tiny", 50, "synth"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let got = viewer
        .get_job(pb::GetJobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.created_by, "alice");
    let cancel = || pb::CancelJobRequest {
        job_id: job.clone(),
    };
    let (c, m) = code(bob.cancel_job(cancel()).await);
    assert_eq!(c, Code::PermissionDenied);
    assert!(m.contains("started by 'alice'"), "{m}");
    let (c, _) = code(viewer.cancel_job(cancel()).await);
    assert_eq!(c, Code::PermissionDenied);
    let other = bob
        .start_training(start_request("tiny", 50, "synth"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let cancelled = alice.cancel_job(cancel()).await.unwrap().into_inner();
    assert_eq!(cancelled.state, pb::JobState::Cancelled as i32);
    // admin: anyone's job, and downloads.
    let mut admin = training(&server, Some(ADMIN)).await;
    let (c, m) = code(
        admin
            .cancel_job(pb::CancelJobRequest { job_id: other })
            .await,
    );
    assert_eq!(c, Code::Ok, "{m}");
    let download = start_request("tiny", 1, "missing-cifar");
    let (c, m) = code(alice.start_training(download.clone()).await);
    assert_eq!(c, Code::PermissionDenied);
    assert!(m.contains("downloads its dataset needs role admin"), "{m}");
    assert_eq!(code(admin.start_training(download).await).0, Code::Ok);

    // SIGHUP reloads the file: a new viewer token works, the old one no longer does...
    const NEW_VIEWER: &str = "viewer-token-rotated-99";
    token_file(dir.path(), NEW_VIEWER);
    let pid = server.child.id().to_string();
    let hup = || Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    assert!(hup().success());
    let mut rotated = false;
    for _ in 0..50 {
        let fresh = code(
            training(&server, Some(NEW_VIEWER))
                .await
                .list_jobs(pb::ListJobsRequest::default())
                .await,
        );
        if fresh.0 == Code::Ok {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rotated, "SIGHUP did not reload the token file");
    let (c, _) = code(viewer.list_jobs(pb::ListJobsRequest::default()).await);
    assert_eq!(c, Code::Unauthenticated);
    // ...and a bad file keeps the tokens in force.
    std::fs::write(&tokens, "admin root short\n").unwrap();
    assert!(hup().success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        code(admin.list_jobs(pb::ListJobsRequest::default()).await).0,
        Code::Ok
    );
    assert!(server.child.try_wait().unwrap().is_none(), "still serving");
    let status = server.signal_and_wait("TERM");
    assert!(status.success());
}

#[test]
fn a_public_address_needs_tokens_or_an_explicit_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tlb"))
        .args(["serve", "--addr", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to serve 0.0.0.0:0 without authentication"),
        "{err}"
    );
    assert!(err.contains("--insecure-no-auth"), "{err}");
    let mut opted_out = Command::new(env!("CARGO_BIN_EXE_tlb"));
    opted_out
        .args([
            "serve",
            "--addr",
            "0.0.0.0:0",
            "--insecure-no-auth",
            "--data-dir",
        ])
        .arg(dir.path().join("data"));
    let server = Server::spawn(opted_out, dir.path());
    assert!(server.addr.contains("0.0.0.0:"), "{}", server.addr);
}

/// Boolean environment variables read as people write them (`0/1/yes/no/on/off`), and a
/// server without a token file survives SIGHUP (its default action would end it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boolean_env_values_and_sighup_without_a_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let public = |value: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tlb"));
        cmd.args(["serve", "--addr", "0.0.0.0:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .env("TLB_INSECURE_NO_AUTH", value);
        cmd
    };
    for off in ["0", "off", "no", "false"] {
        let out = public(off).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{off}");
        assert!(err.contains("refusing to serve"), "{off}: {err}");
    }
    let out = public("maybe").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("maybe"), "{err}");
    for on in ["1", "on"] {
        let server = Server::spawn(public(on), dir.path());
        assert!(server.addr.contains("0.0.0.0:"), "{on}: {}", server.addr);
    }
    let mut server = Server::start(dir.path(), &[]);
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "SIGHUP ended the server"
    );
    server.until_serving().await;
}

/// Runs the `tlb` client; returns (success, stdout + stderr).
fn tlb(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tlb"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn tls_and_mutual_tls_with_the_tlb_client() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let made = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/make-certs.sh"))
        .arg(&certs)
        .status()
        .unwrap();
    assert!(made.success());
    let c = |name: &str| certs.join(name).to_string_lossy().into_owned();
    let tokens = token_file(dir.path(), VIEWER);
    let server = Server::start(
        dir.path(),
        &[
            "--auth-tokens",
            tokens.to_str().unwrap(),
            "--tls-cert",
            &c("server.pem"),
            "--tls-key",
            &c("server.key"),
            "--tls-client-ca",
            &c("ca.pem"),
        ],
    );
    let https = server.addr.replace("http://", "https://");
    let (ok, out) = tlb(&[
        "jobs",
        "--server",
        &https,
        "--token",
        VIEWER,
        "--ca-cert",
        &c("ca.pem"),
        "--client-cert",
        &c("client.pem"),
        "--client-key",
        &c("client.key"),
    ]);
    assert!(ok, "mTLS with a token: {out}");
    // No client certificate: the handshake fails.
    let (ok, out) = tlb(&[
        "jobs",
        "--server",
        &https,
        "--token",
        VIEWER,
        "--ca-cert",
        &c("ca.pem"),
    ]);
    assert!(!ok, "{out}");
    // The right certificate but no token: UNAUTHENTICATED.
    let (ok, out) = tlb(&[
        "jobs",
        "--server",
        &https,
        "--ca-cert",
        &c("ca.pem"),
        "--client-cert",
        &c("client.pem"),
        "--client-key",
        &c("client.key"),
    ]);
    assert!(!ok && out.contains("Unauthenticated"), "{out}");
    // Plaintext is refused.
    let (ok, out) = tlb(&["jobs", "--server", &server.addr, "--token", VIEWER]);
    assert!(!ok, "{out}");
}
