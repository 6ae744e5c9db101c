//! The device workers as the server sees them: which answered their first operation, which
//! are training, which models each has loaded; where an inference request goes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::Sender;
use uuid::Uuid;

use super::{Request, WorkerHandle};
use crate::engine::backend::DeviceSpec;

/// A device worker as the router sees it.
pub(super) struct Slot {
    pub tx: Sender<Request>,
    /// It answered its first operation (a device that failed to start gets nothing).
    pub alive: Arc<AtomicBool>,
    /// It is running a training job (inference waits for the gaps between steps).
    pub training: Arc<AtomicBool>,
    /// Checkpoints it has loaded.
    pub cached: Arc<Mutex<Vec<Uuid>>>,
}

/// What is told when the first device works (or none does).
pub(super) type ReadyFn = Box<dyn FnOnce(Result<(), String>) + Send>;

/// Calls `ready` once: with Ok as soon as one device works, or with every device's error
/// when none does.
pub(super) struct ReadyAll {
    pub left: usize,
    pub errors: Vec<String>,
    pub ready: Option<ReadyFn>,
}

impl ReadyAll {
    pub fn report(state: &Mutex<Self>, result: Result<(), String>) {
        let mut s = state.lock().expect("ready state");
        s.left -= 1;
        match result {
            Ok(()) => {
                if let Some(ready) = s.ready.take() {
                    ready(Ok(()));
                }
            }
            Err(e) => {
                s.errors.push(e);
                if s.left == 0 {
                    let why = s.errors.join("; ");
                    if let Some(ready) = s.ready.take() {
                        ready(Err(why));
                    }
                }
            }
        }
    }
}

/// Names of the devices for the store and metrics: `cpu`, or `cpu#0`, `cpu#1` when one is
/// given more than once.
pub fn device_labels(devices: &[DeviceSpec]) -> Vec<String> {
    devices
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let name = d.to_string();
            if devices.iter().filter(|o| o.to_string() == name).count() > 1 {
                format!("{name}#{i}")
            } else {
                name
            }
        })
        .collect()
}

impl WorkerHandle {
    /// Where a request for `model` goes: the inference thread; else an idle device that has
    /// the model loaded, any idle device, a busy one that has it, any working one in turn.
    pub(super) fn route(&self, model: Uuid) -> &Sender<Request> {
        if let Some(tx) = &self.infer_tx {
            return tx;
        }
        let alive: Vec<&Slot> = self
            .slots
            .iter()
            .filter(|s| s.alive.load(Ordering::SeqCst))
            .collect();
        let idle = |s: &&&Slot| !s.training.load(Ordering::SeqCst);
        let has = |s: &&&Slot| s.cached.lock().expect("cache ids").contains(&model);
        let pick = alive
            .iter()
            .filter(idle)
            .find(has)
            .or_else(|| alive.iter().find(idle))
            .or_else(|| alive.iter().find(has));
        match pick {
            Some(slot) => &slot.tx,
            None if alive.is_empty() => &self.slots[0].tx,
            None => &alive[self.next.fetch_add(1, Ordering::Relaxed) % alive.len()].tx,
        }
    }
}
