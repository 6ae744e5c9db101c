//! Generated protobuf and tonic code for `proto/tlb/v1` and `proto/inference`.

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("tlb.v1");
}

/// The Open Inference Protocol (KServe v2), package `inference`.
#[allow(clippy::all, clippy::pedantic)]
pub mod inference {
    tonic::include_proto!("inference");
}

/// The encoded descriptors of `tlb.v1`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tlb_descriptor");
