//! The S3 server the integration tests start: s3s-fs (crates.io), the S3 protocol over
//! objects stored as files, with request signatures checked. This is its own binary's `main`,
//! built with the tests (a `cargo install s3s-fs` would build hyper, tokio and the rest a
//! second time).
//!
//! `s3s_fs ROOT ACCESS_KEY SECRET_KEY [PORT]`: serves `ROOT` (a bucket per folder) on
//! 127.0.0.1 (port 0 picks one) and prints `s3 listening on ADDR` once it accepts.

use std::io::Write;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [root, access_key, secret_key, rest @ ..] = &args[..] else {
        return Err("usage: s3s_fs ROOT ACCESS_KEY SECRET_KEY [PORT]".into());
    };
    let port: u16 = rest.first().map_or(Ok(0), |p| p.parse())?;
    let service = {
        let fs = s3s_fs::FileSystem::new(root).map_err(|e| format!("{root}: {e:?}"))?;
        let mut b = S3ServiceBuilder::new(fs);
        b.set_auth(SimpleAuth::from_single(
            access_key.as_str(),
            secret_key.as_str(),
        ));
        b.build()
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("s3 listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let (socket, _) = listener.accept().await?;
        let conn = http
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
