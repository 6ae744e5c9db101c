//! Every class of bad request gets a precise status, and the server keeps serving.

use crate::common;

use std::time::Duration;

use common::server::{
    encoded, final_state, get_job, png, start_job, start_request, watch_to_end, Server,
};
use common::{rss_peak_kib, write_synthetic_cifar};
use tlb::proto::v1 as pb;
use tonic::Code;

fn expect(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("the request should fail");
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(
        status.message().contains(needle),
        "'{}' does not mention '{needle}'",
        status.message()
    );
}

fn with_config(config: pb::TrainingConfig) -> pb::StartTrainingRequest {
    pb::StartTrainingRequest {
        config: Some(config),
        ..start_request("tiny", 1, "synth")
    }
}

fn dataset(format: &str, path: &str) -> pb::StartTrainingRequest {
    pb::StartTrainingRequest {
        dataset: Some(pb::Dataset {
            format: format.into(),
            path: path.into(),
            ..Default::default()
        }),
        ..start_request("tiny", 1, "synth")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let datasets = dir.path().join("datasets");
    write_synthetic_cifar(&datasets.join("synth"), 300, 50);
    // An image folder with a corrupt file: its job fails.
    for class in ["a", "b"] {
        std::fs::create_dir_all(datasets.join("broken").join(class)).unwrap();
        std::fs::write(
            datasets.join("broken").join(class).join("ok.png"),
            png(8, 1),
        )
        .unwrap();
    }
    std::fs::write(datasets.join("broken/b/bad.png"), b"not a png").unwrap();
    let server = Server::start(dir.path(), &[]);
    let mut t = server.training().await;
    let mut inf = server.inference().await;

    // Before any model exists.
    let one = vec![encoded(png(32, 1))];
    let classify = |model: &str, images: Vec<pb::Image>, top_k: u32| pb::ClassifyRequest {
        model: model.into(),
        images,
        top_k,
    };
    expect(
        inf.classify(classify("", one.clone(), 1)).await,
        Code::FailedPrecondition,
        "no trained model",
    );

    // StartTraining: each field.
    let mut req = start_request("huge", 1, "synth");
    expect(
        t.start_training(req.clone()).await,
        Code::InvalidArgument,
        "preset",
    );
    req.preset = "tiny".into();
    req.dataset = None;
    expect(
        t.start_training(req).await,
        Code::InvalidArgument,
        "dataset",
    );
    expect(
        t.start_training(dataset("mnist", "synth")).await,
        Code::InvalidArgument,
        "dataset.format",
    );
    expect(
        t.start_training(dataset("cifar10", "../synth")).await,
        Code::InvalidArgument,
        "escapes the datasets root",
    );
    expect(
        t.start_training(dataset("cifar10", "/etc")).await,
        Code::InvalidArgument,
        "escapes the datasets root",
    );
    expect(
        t.start_training(dataset("cifar10", "")).await,
        Code::InvalidArgument,
        "dataset.path",
    );
    expect(
        t.start_training(dataset("cifar10", "missing")).await,
        Code::FailedPrecondition,
        "--allow-download",
    );
    let chunk = pb::TrainingConfig {
        chunk_size: Some(5),
        ..Default::default()
    };
    expect(
        t.start_training(with_config(chunk)).await,
        Code::InvalidArgument,
        "config.chunk_size",
    );
    let epochs = pb::TrainingConfig {
        epochs: Some(0),
        ..Default::default()
    };
    expect(
        t.start_training(with_config(epochs)).await,
        Code::InvalidArgument,
        "config.epochs",
    );
    let lr = pb::TrainingConfig {
        lr: Some(-1.0),
        ..Default::default()
    };
    expect(
        t.start_training(with_config(lr)).await,
        Code::InvalidArgument,
        "config.lr",
    );
    let precision = pb::TrainingConfig {
        precision: 7,
        ..Default::default()
    };
    expect(
        t.start_training(with_config(precision)).await,
        Code::InvalidArgument,
        "config.precision",
    );

    // Ids and tokens.
    let get = |id: &str| pb::GetJobRequest { job_id: id.into() };
    expect(
        t.get_job(get("not-a-uuid")).await,
        Code::InvalidArgument,
        "job_id",
    );
    let unknown = uuid::Uuid::new_v4().to_string();
    expect(t.get_job(get(&unknown)).await, Code::NotFound, &unknown);
    expect(
        t.watch_job(pb::WatchJobRequest {
            job_id: unknown.clone(),
        })
        .await,
        Code::NotFound,
        "no job",
    );
    expect(
        t.list_checkpoints(pb::ListCheckpointsRequest {
            job_id: unknown.clone(),
        })
        .await,
        Code::NotFound,
        "no job",
    );
    expect(
        t.cancel_job(pb::CancelJobRequest {
            job_id: unknown.clone(),
        })
        .await,
        Code::NotFound,
        "no job",
    );
    let page = pb::ListJobsRequest {
        page_token: "garbage".into(),
        ..Default::default()
    };
    expect(t.list_jobs(page).await, Code::InvalidArgument, "page_token");
    let state = pb::ListJobsRequest {
        state: 42,
        ..Default::default()
    };
    expect(t.list_jobs(state).await, Code::InvalidArgument, "state");

    // A job that fails (corrupt image) has no checkpoint to classify with.
    let failed = start_job(&mut t, dataset("image-folder", "broken")).await;
    let events = watch_to_end(&mut t, &failed, Duration::from_secs(120)).await;
    assert_eq!(final_state(&events), pb::JobState::Failed);
    let job = get_job(&mut t, &failed).await;
    assert!(job.error.contains("bad.png"), "error: {}", job.error);
    expect(
        inf.classify(classify(&failed, one.clone(), 1)).await,
        Code::FailedPrecondition,
        "no checkpoint",
    );
    expect(
        inf.classify(classify(&unknown, one.clone(), 1)).await,
        Code::NotFound,
        "no job or checkpoint",
    );
    expect(
        inf.classify(classify("model-x", one.clone(), 1)).await,
        Code::InvalidArgument,
        "model",
    );

    // A model to send bad images to.
    let ok = start_job(&mut t, start_request("tiny", 1, "synth")).await;
    let events = watch_to_end(&mut t, &ok, Duration::from_secs(120)).await;
    assert_eq!(final_state(&events), pb::JobState::Succeeded);
    expect(
        inf.classify(classify(&ok, vec![], 1)).await,
        Code::InvalidArgument,
        "images",
    );
    let bad = vec![encoded(png(32, 1)), encoded(b"GIF89a...".to_vec())];
    expect(
        inf.classify(classify(&ok, bad, 1)).await,
        Code::InvalidArgument,
        "images[1].encoded",
    );
    let raw = |w, h, n| pb::Image {
        source: Some(pb::image::Source::Raw(pb::RawImage {
            width: w,
            height: h,
            rgb8: vec![0; n],
        })),
    };
    expect(
        inf.classify(classify(&ok, vec![raw(4, 4, 47)], 1)).await,
        Code::InvalidArgument,
        "images[0].raw.rgb8",
    );
    expect(
        inf.classify(classify(&ok, vec![raw(0, 4, 0)], 1)).await,
        Code::InvalidArgument,
        "images[0].raw",
    );
    expect(
        inf.classify(classify(&ok, vec![raw(5000, 1, 15000)], 1))
            .await,
        Code::ResourceExhausted,
        "4096",
    );
    expect(
        inf.classify(classify(&ok, vec![pb::Image { source: None }], 1))
            .await,
        Code::InvalidArgument,
        "images[0]",
    );
    expect(
        inf.classify(classify(&ok, one.clone(), 11)).await,
        Code::InvalidArgument,
        "top_k",
    );
    expect(
        inf.classify(classify(&ok, vec![raw(2, 2, 12); 257], 1))
            .await,
        Code::ResourceExhausted,
        "256",
    );
    // A message over the 64 MiB limit (two of the largest raw images).
    let huge = vec![raw(4096, 4096, 4096 * 4096 * 3); 2];
    expect(
        inf.classify(classify(&ok, huge, 1)).await,
        Code::ResourceExhausted,
        "too large",
    );
    let att = |image: Option<pb::Image>, size| pb::GetAttentionRequest {
        model: ok.clone(),
        image,
        render_overlay: true,
        overlay_size: size,
        side_by_side: None,
    };
    expect(
        inf.get_attention(att(None, 0)).await,
        Code::InvalidArgument,
        "image",
    );
    expect(
        inf.get_attention(att(Some(encoded(png(8, 1))), 5000)).await,
        Code::InvalidArgument,
        "overlay_size",
    );

    // A checkpoint whose files were removed behind the server's back.
    let gone = start_job(&mut t, start_request("tiny", 1, "synth")).await;
    let events = watch_to_end(&mut t, &gone, Duration::from_secs(120)).await;
    assert_eq!(final_state(&events), pb::JobState::Succeeded);
    // Served once (so the worker holds it in memory), then its files go: not served from
    // memory either (ModelReady says the same).
    inf.classify(classify(&gone, one.clone(), 1)).await.unwrap();
    std::fs::remove_dir_all(dir.path().join("data/jobs").join(&gone).join("checkpoints")).unwrap();
    expect(
        inf.classify(classify(&gone, one.clone(), 1)).await,
        Code::FailedPrecondition,
        "no file",
    );

    // Still serving: the same requests done right succeed.
    let out = inf
        .classify(classify(&ok, one.clone(), 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.results[0].predictions.len(), 3);
    let done = t
        .cancel_job(pb::CancelJobRequest { job_id: ok.clone() })
        .await;
    expect(done, Code::FailedPrecondition, "already ended");
}

/// Sends pre-encoded request bytes as they are (the test builds wire data no client struct
/// would hold cheaply: 30 million empty images).
#[derive(Clone, Copy)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = prost::bytes::Bytes;
    type Decode = prost::bytes::Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = prost::bytes::Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: prost::bytes::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put(dst, item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = prost::bytes::Bytes;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<prost::bytes::Bytes>, tonic::Status> {
        let n = prost::bytes::Buf::remaining(src);
        Ok(Some(prost::bytes::Buf::copy_to_bytes(src, n)))
    }
}

/// Requests that are a few bytes per image on the wire but would become one allocation per
/// image (the sweep's: 1.4 GiB of server memory each) are refused before that: 16 at once,
/// each on a connection of its own, all RESOURCE_EXHAUSTED within a second, the server's
/// peak memory bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amplifying_requests_are_refused_before_they_take_memory() {
    use prost::Message;
    use tlb::proto::inference as oip;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    // 21 million 1×1 images in a 63 MB raw tensor.
    let infer = oip::ModelInferRequest {
        model_name: "any".into(),
        inputs: vec![oip::model_infer_request::InferInputTensor {
            name: "images".into(),
            datatype: "UINT8".into(),
            shape: vec![21_000_000, 1, 1, 3],
            ..Default::default()
        }],
        raw_input_contents: vec![vec![0; 63_000_000]],
        ..Default::default()
    };
    let infer = prost::bytes::Bytes::from(infer.encode_to_vec());
    // 30 million empty `images` entries (field 2): 60 MB.
    let classify = prost::bytes::Bytes::from([0x12_u8, 0].repeat(30_000_000));
    let before = rss_peak_kib(server.child.id());
    let mut calls = Vec::new();
    for i in 0..16 {
        let (path, body) = if i % 2 == 0 {
            ("/inference.GRPCInferenceService/ModelInfer", infer.clone())
        } else {
            ("/tlb.v1.InferenceService/Classify", classify.clone())
        };
        let channel = server.channel().await;
        calls.push(tokio::spawn(async move {
            let mut grpc = tonic::client::Grpc::new(channel)
                .max_encoding_message_size(usize::MAX)
                .max_decoding_message_size(usize::MAX);
            grpc.ready().await.unwrap();
            let started = std::time::Instant::now();
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
            let result = grpc.unary(tonic::Request::new(body), path, RawCodec).await;
            (result, started.elapsed())
        }));
    }
    let mut slowest = Duration::ZERO;
    for call in calls {
        let (result, took) = call.await.unwrap();
        let status = result.expect_err("refused");
        assert_eq!(
            status.code(),
            Code::ResourceExhausted,
            "{}",
            status.message()
        );
        slowest = slowest.max(took);
    }
    let peak = rss_peak_kib(server.child.id());
    println!(
        "16 amplifying requests (8 ModelInfer of 21M images in 63 MB, 8 Classify of 30M empty \
         images in 60 MB): all RESOURCE_EXHAUSTED, slowest answer {:.3} s; server peak RSS \
         {} MiB (before {} MiB)",
        slowest.as_secs_f64(),
        peak / 1024,
        before / 1024
    );
    // (About 0.6 s on an idle 2-core machine, most of it the two admitted 63 MB uploads; the
    // bound leaves room for the other tests running beside this one.)
    assert!(slowest < Duration::from_secs(2), "slowest {slowest:?}");
    assert!(
        peak < before + 512 * 1024,
        "peak RSS {} MiB (before {} MiB)",
        peak / 1024,
        before / 1024
    );
    // Still serving small requests.
    let mut inf = server.inference().await;
    expect(
        inf.classify(pb::ClassifyRequest {
            model: String::new(),
            images: vec![encoded(png(8, 1))],
            top_k: 1,
        })
        .await,
        Code::FailedPrecondition,
        "no trained model yet",
    );
}
