//! ImportModel: a model exported from one server serves on another with the same
//! probabilities; bad files and bad streams are refused precisely and leave nothing behind.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};
use tlb::engine::backend::{cpu_device, Cpu};
use tlb::engine::train::{export_safetensors, import_safetensors, named_tensors, Preset};
use tlb::proto::inference as oip;
use tlb::proto::v1 as pb;
use tlb::proto::v1::import_model_request::Part;
use tonic::Code;

use crate::common;
use common::server::{encoded, png, start_job, start_request, watch_to_end, Server};

fn labels(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("kind-{i}")).collect()
}

/// A `tiny` model's export (fresh weights), with its labels.
fn exported() -> Vec<u8> {
    let _serial = common::serial();
    let cfg = Preset::Tiny.config().model;
    let model = cfg.init::<Cpu>(&cpu_device()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    export_safetensors(&model, &labels(cfg.num_classes), &path).unwrap();
    std::fs::read(path).unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The messages of an import of `bytes` (chunks of 64 KiB) after `header`.
fn messages(header: pb::ImportModelHeader, bytes: &[u8]) -> Vec<pb::ImportModelRequest> {
    let mut out = vec![pb::ImportModelRequest {
        part: Some(Part::Header(header)),
    }];
    out.extend(bytes.chunks(64 << 10).map(|c| pb::ImportModelRequest {
        part: Some(Part::Chunk(c.to_vec())),
    }));
    out
}

fn header(bytes: &[u8]) -> pb::ImportModelHeader {
    pb::ImportModelHeader {
        name: "m.safetensors".into(),
        total_bytes: bytes.len() as u64,
        sha256: sha256(bytes),
        ..Default::default()
    }
}

async fn import(
    server: &Server,
    messages: Vec<pb::ImportModelRequest>,
) -> Result<pb::ModelInfo, (Code, String)> {
    server
        .inference()
        .await
        .import_model(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner())
        .map_err(|s| (s.code(), s.message().to_string()))
}

/// `bytes` rewritten: each tensor passed through `edit` (None drops it), metadata kept.
fn rewritten(
    bytes: &[u8],
    edit: impl Fn(&str, Vec<usize>, Vec<u8>) -> Option<(String, Vec<usize>, Vec<u8>)>,
) -> Vec<u8> {
    let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
    let st = SafeTensors::deserialize(bytes).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .filter_map(|(name, view)| edit(&name, view.shape().to_vec(), view.data().to_vec()))
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, data)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    let meta: Option<HashMap<String, String>> = meta.metadata().clone();
    safetensors::serialize(views, meta).unwrap()
}

/// Import is export's inverse: every tensor comes back bit for bit, and the labels.
#[test]
fn import_reads_back_every_exported_tensor() {
    let bytes = exported();
    let device = cpu_device();
    let imported = import_safetensors::<Cpu>(&bytes, "", Vec::new(), 1 << 30, &device).unwrap();
    assert_eq!(imported.labels, labels(10));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors = named_tensors(&imported.model);
    assert_eq!(tensors.len(), st.names().len());
    for t in tensors {
        let stored = st.tensor(&t.name).unwrap();
        let values: Vec<u8> = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            (stored.shape(), stored.data()),
            (&t.shape[..], &values[..]),
            "{}",
            t.name
        );
    }
}

/// A job trained on one server, exported with `tlb export` and imported with `tlb import`
/// into another (its own data dir and store): Classify gives the same probabilities, bit for
/// bit, with the same labels; ListModels and the Open Inference Protocol know the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_trained_on_one_server_serves_on_another_with_the_same_probabilities() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    common::write_synthetic_cifar(&a.path().join("datasets/synth"), 200, 50);
    let trainer = Server::start(a.path(), &[]);
    let mut client = trainer.training().await;
    let job = start_job(&mut client, start_request("tiny", 1, "synth")).await;
    let events = watch_to_end(&mut client, &job, Duration::from_secs(300)).await;
    assert_eq!(
        common::server::final_state(&events),
        pb::JobState::Succeeded
    );

    let dir = common::server::job_dir(a.path(), &job).join("checkpoints");
    let best = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("best"))
        .unwrap_or_else(|| panic!("no best copy in {}", dir.display()));
    let file = a.path().join("exported.safetensors");
    let tlb = env!("CARGO_BIN_EXE_tlb");
    let export = Command::new(tlb)
        .args(["export", "--checkpoint"])
        .arg(&best)
        .arg("--out")
        .arg(&file)
        .output()
        .unwrap();
    assert!(export.status.success(), "{export:?}");

    let server = Server::start(b.path(), &[]);
    let out = Command::new(tlb)
        .args(["import", "--server", &server.addr])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let imported = info["job_id"].as_str().unwrap().to_string();
    assert_eq!(info["is_default"], true, "the newest model is the default");

    let images: Vec<pb::Image> = (0..4).map(|i| encoded(png(32, 40 * i))).collect();
    let there = classify(&trainer, &job, &images).await;
    let here = classify(&server, &imported, &images).await;
    assert_eq!(
        there, here,
        "the same predictions, labels and probabilities"
    );
    assert!(!here[0].predictions[0].label.is_empty(), "{here:?}");

    let models = server.models().await;
    let trained = trainer.models().await;
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].job_id, imported);
    assert_eq!(models[0].labels, trained[0].labels);

    let mut oip_client =
        oip::grpc_inference_service_client::GrpcInferenceServiceClient::new(server.channel().await);
    let meta = oip_client
        .model_metadata(oip::ModelMetadataRequest {
            name: imported.clone(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.outputs[0].shape, vec![-1, 10], "{meta:?}");
}

async fn classify(server: &Server, model: &str, images: &[pb::Image]) -> Vec<pb::ClassifyResult> {
    let request = pb::ClassifyRequest {
        model: model.into(),
        images: images.to_vec(),
        top_k: 10,
    };
    let r = server.inference().await.classify(request).await.unwrap();
    r.into_inner().results
}

/// Every refusal names its cause, with the status a client can act on; afterwards there is
/// no model, no job and no file, and a good import still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_imports_are_refused_precisely_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let good = exported();
    let with = |edit: &dyn Fn(&mut pb::ImportModelHeader)| {
        let mut h = header(&good);
        edit(&mut h);
        messages(h, &good)
    };
    let file = |bytes: Vec<u8>| messages(header(&bytes), &bytes);
    let nan = rewritten(&good, |n, s, mut d| {
        if n == "head.bias" {
            d[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        }
        Some((n.into(), s, d))
    });
    let wrong_shape = rewritten(&good, |n, s, d| {
        let s = if n == "pos_embed" {
            vec![s[1], s[0], s[2]]
        } else {
            s
        };
        Some((n.into(), s, d))
    });
    let missing = rewritten(&good, |n, s, d| {
        (n != "bottleneck.key.weight").then(|| (n.into(), s, d))
    });
    let extra = rewritten(&good, |n, s, d| {
        Some((
            if n == "head.bias" {
                "head.offset".into()
            } else {
                n.into()
            },
            s,
            d,
        ))
    });
    let mut big_header = good.clone();
    big_header[..8].copy_from_slice(&(64u64 << 20).to_le_bytes());

    let cases: Vec<(&str, Vec<pb::ImportModelRequest>, Code, &str)> = vec![
        (
            "no header",
            messages(header(&good), &good)[1..].to_vec(),
            Code::InvalidArgument,
            "header: the first message must be the header",
        ),
        (
            "no size",
            with(&|h| h.total_bytes = 0),
            Code::InvalidArgument,
            "total_bytes: is required",
        ),
        (
            "too big",
            with(&|h| h.total_bytes = 1 << 30),
            Code::ResourceExhausted,
            "the limit is 134217728",
        ),
        (
            "truncated",
            with(&|h| h.total_bytes += 10),
            Code::InvalidArgument,
            "the stream ended after",
        ),
        (
            "too long",
            with(&|h| h.total_bytes -= 10),
            Code::InvalidArgument,
            "more bytes than that were sent",
        ),
        (
            "bad sha",
            with(&|h| h.sha256 = "0".repeat(64)),
            Code::InvalidArgument,
            "sha256: the bytes received hash to",
        ),
        (
            "sha format",
            with(&|h| h.sha256 = "xyz".into()),
            Code::InvalidArgument,
            "sha256: must be 64 hex digits",
        ),
        (
            "labels",
            with(&|h| h.labels = labels(3)),
            Code::InvalidArgument,
            "labels: 3 names for a model of 10 classes",
        ),
        (
            "config",
            with(&|h| h.config_json = "{not json".into()),
            Code::InvalidArgument,
            "config: not a model config",
        ),
        (
            "nan",
            file(nan),
            Code::InvalidArgument,
            "head.bias (value NaN at index 1 is not finite)",
        ),
        (
            "shape",
            file(wrong_shape),
            Code::InvalidArgument,
            "wrong tensors: pos_embed (shape",
        ),
        (
            "missing",
            file(missing),
            Code::InvalidArgument,
            "missing tensors: bottleneck.key.weight",
        ),
        (
            "extra",
            file(extra),
            Code::InvalidArgument,
            "unexpected tensors: head.offset",
        ),
        (
            "header size",
            file(big_header),
            Code::InvalidArgument,
            "the header declares 67108864 bytes; the limit is 1048576",
        ),
        (
            "not safetensors",
            file(b"hello world, no tensors".to_vec()),
            Code::InvalidArgument,
            "safetensors: ",
        ),
    ];
    for (what, messages, code, expected) in cases {
        let (got, message) = import(&server, messages).await.unwrap_err();
        assert_eq!(got, code, "{what}: {message}");
        assert!(message.contains(expected), "{what}: {message}");
    }
    let models = server.models().await;
    assert!(models.is_empty(), "{models:?}");
    assert_no_jobs(dir.path());

    let info = import(&server, file(good.clone())).await.unwrap();
    assert_eq!(info.labels, labels(10));
    let classified = server
        .inference()
        .await
        .classify(pb::ClassifyRequest {
            model: info.model_id.clone(),
            images: vec![encoded(png(32, 1))],
            top_k: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(classified.model, info.model_id);
    assert!(classified.results[0].predictions[0]
        .label
        .starts_with("kind-"));
}

fn assert_no_jobs(root: &Path) {
    let jobs: Vec<_> = std::fs::read_dir(root.join("data/jobs"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(jobs.is_empty(), "{jobs:?}");
}
