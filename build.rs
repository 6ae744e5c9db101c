//! Compiles `proto/tlb/v1/*.proto`, `proto/inference/` (Open Inference Protocol) and
//! `proto/tensorboard/` (event files) with a vendored protoc (no system package needed), and
//! writes the descriptor set that server reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/tlb/v1/training.proto",
        "proto/tlb/v1/inference.proto",
        "proto/tlb/v1/datasets.proto",
        "proto/tlb/v1/search.proto",
        // The Open Inference Protocol (KServe v2), for Triton/KServe clients.
        "proto/inference/grpc_predict_v2.proto",
    ];
    // Every message knows its protobuf name (prost::Name): the codec scans a request's wire
    // format by it before decoding (src/grpc/wire).
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tlb_descriptor.bin"))
        .codec_path("crate::grpc::wire::GuardedCodec")
        .compile_with_config(config, &protos, &["proto"])?;
    // `cube_kernels`: a cube backend without fusion is built (wgpu, or CUDA without burn's
    // fusion), so tlb's CubeCL kernels (src/engine/model/cube) have a backend to run on.
    println!("cargo:rustc-check-cfg=cfg(cube_kernels)");
    let feature = |f: &str| std::env::var_os(format!("CARGO_FEATURE_{f}")).is_some();
    if feature("WGPU") || (feature("CUDA") && !feature("CUDA_FUSION")) {
        println!("cargo:rustc-cfg=cube_kernels");
    }
    // TensorBoard's event records and HParams plugin data (src/engine/tensorboard): plain
    // messages, no services; google.protobuf.Value comes from prost-types.
    let tensorboard = [
        "proto/tensorboard/event.proto",
        "proto/tensorboard/hparams.proto",
    ];
    let include = protoc_bin_vendored::include_path()?;
    let files = tensorboard.map(std::path::PathBuf::from);
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_protos(&files, &[std::path::PathBuf::from("proto"), include])?;
    for p in protos.iter().chain(&tensorboard) {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
