//! Triton extends `inference.GRPCInferenceService` with RPCs tlb does not serve
//! (`ModelConfig`, `ModelStatistics`, `RepositoryIndex`, shared memory, …). tonic answers an
//! unknown method with a bare UNIMPLEMENTED; this wrapper says which RPCs there are instead.

use std::convert::Infallible;
use std::task::{Context, Poll};

use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::Status;

/// The RPCs of the Open Inference Protocol that tlb serves.
const SERVED: [&str; 6] = [
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
];

/// Wraps the generated `GrpcInferenceServiceServer`.
#[derive(Clone)]
pub struct OnlyOpenInference<S>(pub S);

impl<S: NamedService> NamedService for OnlyOpenInference<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for OnlyOpenInference<S>
where
    S: Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
            Future = BoxFuture<http::Response<tonic::body::Body>, Infallible>,
        > + Send,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().rsplit('/').next().unwrap_or_default();
        if SERVED.contains(&method) {
            return self.0.call(req);
        }
        let status = Status::unimplemented(format!(
            "inference.GRPCInferenceService/{method} is not served by tlb: it implements the \
             Open Inference Protocol (KServe v2) RPCs {}, not Triton's extensions",
            SERVED.join(", ")
        ));
        Box::pin(async move { Ok(status.into_http()) })
    }
}
