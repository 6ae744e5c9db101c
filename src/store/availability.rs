//! Whether the job store can be reached, and failing fast while it cannot. A probe (`SELECT
//! 1`) runs every second; while the last one failed, every store call fails at once with
//! [`StoreUnavailable`] instead of waiting for the pool's connect timeout, so that calls are
//! answered UNAVAILABLE (which clients and load balancers retry elsewhere) within
//! milliseconds, and shutdown is not held up by one timeout per pending write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;
use tokio::sync::watch;

use super::Store;

/// How long a connection may take before a call fails (sqlx's default is 30 s).
pub(super) const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the probe waits for its answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the probe runs.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The job store cannot be reached (its server is down or unreachable).
#[derive(Debug, thiserror::Error)]
#[error("the job store is unavailable ({0}); retry later")]
pub struct StoreUnavailable(pub String);

/// True when `e` says the store could not be reached (not that it refused a request): the
/// calls that fail so are answered UNAVAILABLE.
pub(super) fn is_unavailable(e: &anyhow::Error) -> bool {
    unavailable(e).is_some()
}

/// Why the store could not be reached, when that is what `e` says: the reason a
/// [`StoreUnavailable`] in its chain gives (also inside a [`super::StoreError`]), or the
/// driver's error when it is one of connecting.
pub fn unavailable(e: &anyhow::Error) -> Option<StoreUnavailable> {
    let named = e.chain().find_map(|cause| {
        cause.downcast_ref::<StoreUnavailable>().or_else(|| {
            match cause.downcast_ref::<super::StoreError>() {
                Some(super::StoreError::Unavailable(down)) => Some(down),
                _ => None,
            }
        })
    });
    if let Some(down) = named {
        return Some(StoreUnavailable(down.0.clone()));
    }
    let connecting = e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<sqlx::Error>(),
            Some(
                sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::WorkerCrashed
            )
        )
    });
    connecting.then(|| StoreUnavailable(format!("{e:#}")))
}

/// Whether the last probe reached the store (true until one says otherwise).
#[derive(Clone, Debug)]
pub(super) struct Up(Arc<AtomicBool>);

impl Default for Up {
    fn default() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }
}

impl Store {
    /// The pool, or at once [`StoreUnavailable`] while the probe says the store is down.
    pub(super) fn pool(&self) -> Result<&AnyPool> {
        if !self.up.0.load(Ordering::Relaxed) {
            return Err(StoreUnavailable("the last probe could not reach it".into()).into());
        }
        Ok(&self.pool)
    }

    /// One `SELECT 1`, bounded by a short timeout.
    pub async fn probe(&self) -> bool {
        let ping = sqlx::query("SELECT 1").execute(&self.pool);
        matches!(tokio::time::timeout(PROBE_TIMEOUT, ping).await, Ok(Ok(_)))
    }

    /// Probes the store every [`PROBE_EVERY`] from now on (a tokio task), keeps the fail-fast
    /// flag current, logs each change, and tells the receiver whether the store is up.
    pub fn watch_availability(&self) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(true);
        let store = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(PROBE_EVERY);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let up = store.probe().await;
                if store.up.0.swap(up, Ordering::Relaxed) != up {
                    if up {
                        tracing::info!("the job store is reachable again");
                    } else {
                        tracing::warn!(
                            "the job store is unreachable: calls that need it fail at once \
                             (UNAVAILABLE) and training writes wait for it; models already \
                             resolved are still served"
                        );
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tx.send_if_modified(|last| std::mem::replace(last, up) != up);
            }
        });
        rx
    }
}

/// Connects the pool, retrying with backoff (1 s doubling to 30 s) while the store cannot be
/// reached, for at most `wait`; errors that a retry cannot mend (a wrong password, a bad
/// URL) end it at once.
pub(super) async fn connect_with_retry(
    options: AnyPoolOptions,
    url: &str,
    shown: &str,
    wait: Duration,
) -> Result<AnyPool> {
    let started = tokio::time::Instant::now();
    let mut backoff = Duration::from_secs(1);
    loop {
        match options.clone().connect(url).await {
            Ok(pool) => return Ok(pool),
            Err(e) => {
                let e = anyhow::Error::from(e);
                let left = wait.saturating_sub(started.elapsed());
                if !is_unavailable(&e) || left.is_zero() {
                    return Err(e.context(format!(
                        "opening the job store {shown} (waited {:.0} s of --store-wait {} s)",
                        started.elapsed().as_secs_f64(),
                        wait.as_secs()
                    )));
                }
                let pause = backoff.min(left);
                tracing::warn!(
                    store = shown,
                    error = %format!("{e:#}"),
                    retry_in_s = pause.as_secs_f64(),
                    "the job store cannot be reached yet; retrying"
                );
                tokio::time::sleep(pause).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}
