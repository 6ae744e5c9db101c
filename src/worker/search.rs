//! Advancing searches: right after one of its trials pauses or ends on this replica, and
//! every few seconds for every running search (a search started through another replica, a
//! trial whose replica died before it could advance its search). Any replica may advance any
//! search: the store decides each step once (`store::searches`).

use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};
use uuid::Uuid;

use crate::metrics::metrics;
use crate::names::Named;
use crate::store::Store;

/// How often each replica advances the running searches.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// Advances search `id` once; logs and counts what it did (a failure is logged: the next
/// sweep tries again).
pub async fn advance(store: &Store, id: Uuid) {
    match store.advance_search(id).await {
        Ok(Some(done)) => {
            metrics().search_promotions.inc_by(done.promoted as u64);
            if done.started + done.promoted + done.stopped > 0 {
                info!(
                    search = %id,
                    started = done.started,
                    promoted = done.promoted,
                    stopped = done.stopped,
                    "search advanced"
                );
            }
            if let Some(state) = done.ended {
                info!(search = %id, state = state.name(), "search ended");
            }
        }
        Ok(None) => {}
        Err(e) if e.is_unavailable() => {}
        Err(e) => warn!(search = %id, error = %format!("{e:#}"), "advancing a search"),
    }
}

/// Advances every running search every [`SWEEP_EVERY`] until shutdown.
pub fn spawn_sweeper(store: Store, mut shutdown: watch::Receiver<bool>) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SWEEP_EVERY) => {}
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
            }
            match store.running_searches().await {
                Ok(ids) => {
                    for id in ids {
                        advance(&store, id).await;
                    }
                }
                Err(e) if e.is_unavailable() => {}
                Err(e) => warn!(error = %format!("{e:#}"), "listing the running searches"),
            }
        }
    });
}
