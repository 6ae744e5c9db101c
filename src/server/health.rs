//! What grpc.health.v1 reports: every service SERVING once the device worker is up and until
//! shutdown, except `tlb.v1.TrainingService`, which is NOT_SERVING while the job store cannot
//! be reached (its every call needs the store). Inference stays SERVING through a store
//! outage: the models it already resolved are served from memory.

use std::sync::Arc;

use tokio::sync::{watch, Mutex};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use super::SERVICES;

const TRAINING: &str = "tlb.v1.TrainingService";

#[derive(Clone)]
pub(super) struct Health {
    reporter: HealthReporter,
    state: Arc<Mutex<State>>,
}

struct State {
    device_ready: bool,
    store_up: bool,
    stopping: bool,
}

impl Health {
    pub(super) async fn new(reporter: HealthReporter) -> Self {
        let health = Self {
            reporter,
            state: Arc::new(Mutex::new(State {
                device_ready: false,
                store_up: true,
                stopping: false,
            })),
        };
        health.update(|_| {}).await;
        health
    }

    pub(super) async fn device_ready(&self) {
        self.update(|s| s.device_ready = true).await;
    }

    pub(super) async fn stopping(&self) {
        self.update(|s| s.stopping = true).await;
    }

    /// Follows the store's availability until the sender goes.
    pub(super) fn follow_store(&self, mut up: watch::Receiver<bool>) {
        let health = self.clone();
        crate::metrics::metrics()
            .store_up
            .set(i64::from(*up.borrow()));
        tokio::spawn(async move {
            while up.changed().await.is_ok() {
                let now = *up.borrow_and_update();
                crate::metrics::metrics().store_up.set(i64::from(now));
                health.update(|s| s.store_up = now).await;
            }
        });
    }

    async fn update(&self, change: impl FnOnce(&mut State)) {
        let mut state = self.state.lock().await;
        change(&mut state);
        let serving = state.device_ready && !state.stopping;
        let status = |on: bool| {
            if on {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        for name in std::iter::once("").chain(SERVICES) {
            let on = serving && (name != TRAINING || state.store_up);
            self.reporter.set_service_status(name, status(on)).await;
        }
    }
}
