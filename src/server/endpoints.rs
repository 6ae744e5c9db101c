//! What `tlb serve` opens besides the gRPC services: the TLS settings, the HTTP face, the
//! Prometheus endpoint, and the SIGHUP reload of the token file.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tracing::info;

use super::ServeArgs;
use crate::auth::Tokens;
use crate::metrics::metrics;
use crate::names::Named;
use crate::store::Store;

/// Serves `GET /metrics` on `addr` until shutdown.
pub(super) async fn serve_metrics(
    addr: SocketAddr,
    store: Store,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    async fn scrape(
        axum::extract::State(store): axum::extract::State<Store>,
    ) -> impl axum::response::IntoResponse {
        match store.count_by_state().await {
            Ok(counts) => {
                for (state, n) in counts {
                    metrics().jobs.with_label_values(&[state.name()]).set(n);
                }
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), "counting jobs for /metrics"),
        }
        match store.trials_by_state().await {
            Ok(counts) => {
                for (state, n) in counts {
                    metrics()
                        .search_trials
                        .with_label_values(&[state.name()])
                        .set(n);
                }
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), "counting trials for /metrics"),
        }
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            crate::metrics::render(),
        )
    }
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(store);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    info!(addr = %listener.local_addr()?, "metrics at /metrics");
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "the metrics endpoint is unauthenticated (Prometheus scrapes it without a token): \
             anyone who reaches this address reads the job counts and call rates; bind it to \
             loopback or a scrape-only network"
        );
    }
    tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

/// Serves the HTTP face on `--http-addr`, when set: over `grpc` (the gRPC port's own stack),
/// with the gRPC port's certificate, key and client CA. Prints where it listens.
pub(super) async fn serve_http(
    args: &ServeArgs,
    grpc: crate::http::GrpcStack,
    tokens: Option<Tokens>,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let Some(addr) = args.http_addr else {
        return Ok(());
    };
    let face = crate::http::Face::new(grpc, tokens)?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(crate::http::tls::server_config(
            cert,
            key,
            args.tls_client_ca.as_deref(),
        )?),
        _ => None,
    };
    let bound = crate::http::serve(addr, crate::http::router(face), tls, shutdown).await?;
    println!("tlb http listening on {bound}");
    Ok(())
}

/// The TLS settings the flags ask for, if any.
pub(super) fn tls_config(args: &ServeArgs) -> Result<Option<tonic::transport::ServerTlsConfig>> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &args.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}

/// SIGHUP reloads the token file; a bad file keeps the tokens in force. Without a token file
/// the signal is logged and ignored (its default action would end the server).
pub(super) fn reload_on_sighup(tokens: Option<Tokens>) -> Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // Installed before the server says it listens: from then on SIGHUP is handled.
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let Some(tokens) = &tokens else {
                    info!(
                        "SIGHUP: no token file to reload (--auth-tokens is unset); nothing to do"
                    );
                    continue;
                };
                match tokens.reload() {
                    Ok(n) => info!(tokens = n, "SIGHUP: token file reloaded"),
                    Err(e) => tracing::error!(
                        error = %format!("{e:#}"),
                        "SIGHUP: token file not reloaded; the tokens in force stay"
                    ),
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = tokens;
    Ok(())
}
