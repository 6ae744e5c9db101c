//! How the `tlb` client reaches a server: the address, the bearer token, TLS and mTLS.

use anyhow::{Context, Result};
use clap::Args;
use tonic::transport::Channel;

#[derive(Args, Debug, Clone)]
pub struct ServerArg {
    /// The server's address (`https://…` for TLS).
    #[arg(long, env = "TLB_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Bearer token, sent as `authorization: Bearer TOKEN`.
    #[arg(long, env = "TLB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the server's; implies TLS.
    #[arg(long, env = "TLB_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with --client-key.
    #[arg(long, env = "TLB_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<std::path::PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, env = "TLB_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<std::path::PathBuf>,
}

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

/// A connection to the server, with the token on every call.
pub type Conn = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

fn read(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

pub async fn channel(s: &ServerArg) -> Result<Conn> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut endpoint = Channel::from_shared(s.server.clone()).context("bad --server address")?;
    if s.ca_cert.is_some() || s.server.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        tls = match &s.ca_cert {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca)?)),
            None => tls.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&s.client_cert, &s.client_key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint.tls_config(tls).context("TLS settings")?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {}", s.server))?;
    let token = s
        .token
        .as_deref()
        .map(|t| format!("Bearer {t}").parse())
        .transpose()
        .context("--token holds characters a header cannot carry")?;
    Ok(tonic::service::interceptor::InterceptedService::new(
        channel,
        Bearer(token),
    ))
}
