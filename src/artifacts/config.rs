//! The artifact store's flags, and the S3 client they make.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

/// How bucket names go into S3 requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Addressing {
    /// `http://endpoint/bucket/key`: what most self-hosted S3 servers expect.
    #[default]
    Path,
    /// `http://bucket.endpoint/key`: AWS's own style.
    Virtual,
}

/// `tlb serve`'s artifact-store flags.
#[derive(clap::Args, Clone, Debug)]
pub struct ArtifactArgs {
    /// Where checkpoints are kept: unset, the data dir; `s3://BUCKET/PREFIX`, any
    /// S3-compatible service that every replica reaches (credentials from AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN and AWS_DEFAULT_REGION; never logged)
    #[arg(long, env = "TLB_ARTIFACT_STORE", value_name = "URL")]
    pub artifact_store: Option<String>,
    /// The S3 service's URL, for one that is not AWS (e.g. http://127.0.0.1:8014)
    #[arg(long, env = "TLB_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// With a remote store: bytes of checkpoint copies the data dir keeps (least recently used
    /// ones beyond it are removed; the store still holds them)
    #[arg(long, env = "TLB_CACHE_BYTES", default_value_t = DEFAULT_CACHE_BYTES)]
    pub cache_bytes: u64,
    /// How bucket names go into S3 requests
    #[arg(long, env = "TLB_S3_ADDRESSING", value_enum, default_value_t = Addressing::Path)]
    pub s3_addressing: Addressing,
}

/// `--cache-bytes` unless given: 10 GiB.
pub const DEFAULT_CACHE_BYTES: u64 = 10 << 30;

impl Default for ArtifactArgs {
    fn default() -> Self {
        Self {
            artifact_store: None,
            s3_endpoint: None,
            cache_bytes: DEFAULT_CACHE_BYTES,
            s3_addressing: Addressing::Path,
        }
    }
}

/// An S3 client for `s3://BUCKET/PREFIX`, and the prefix. Requests give up after a few quick
/// retries (about 10 s): a store that is down is reported, and retried by the caller.
pub(super) fn s3(args: &ArtifactArgs, url: &str) -> Result<(std::sync::Arc<dyn ObjectStore>, Key)> {
    s3_from(AmazonS3Builder::from_env(), args, url)
}

/// [`s3`] from a builder that holds the credentials (the environment's, or a test's).
pub(super) fn s3_from(
    builder: AmazonS3Builder,
    args: &ArtifactArgs,
    url: &str,
) -> Result<(std::sync::Arc<dyn ObjectStore>, Key)> {
    let Some(rest) = url.strip_prefix("s3://") else {
        bail!("--artifact-store {url}: expected s3://BUCKET/PREFIX (or nothing: the data dir)");
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        bail!("--artifact-store {url}: the bucket name is missing (s3://BUCKET/PREFIX)");
    }
    let prefix = Key::parse(prefix.trim_matches('/'))
        .with_context(|| format!("--artifact-store {url}: the prefix"))?;
    let mut builder = builder
        .with_bucket_name(bucket)
        .with_virtual_hosted_style_request(args.s3_addressing == Addressing::Virtual)
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: Duration::from_secs(10),
        })
        .with_client_options(
            ClientOptions::new()
                .with_connect_timeout(Duration::from_secs(3))
                .with_timeout(Duration::from_secs(120)),
        );
    if std::env::var_os("AWS_DEFAULT_REGION").is_none() && std::env::var_os("AWS_REGION").is_none()
    {
        builder = builder.with_region("us-east-1");
    }
    if let Some(endpoint) = &args.s3_endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    let store = builder
        .build()
        .with_context(|| format!("--artifact-store {url}"))?;
    Ok((std::sync::Arc::new(store), prefix))
}
