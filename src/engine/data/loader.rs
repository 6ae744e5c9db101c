//! Batches prepared on CPU threads ahead of the training step.
//!
//! The order and augmentation of an epoch depend only on `(seed, epoch)`, and each batch's
//! augmentation only on `(seed, epoch, batch index)`, so a run resumed mid-epoch sees exactly
//! the batches the uninterrupted run would have seen, whatever the thread timing.

use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::augment::Augmenter;
use super::set::Split;

/// One batch in host memory, ready to become a tensor `[len, 3, side, side]`.
#[derive(Debug, Clone)]
pub struct Batch {
    pub images: Vec<f32>,
    pub labels: Vec<i64>,
    pub side: usize,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// SplitMix64 finaliser: a well-mixed 64-bit value from any input.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A deterministic RNG for a purpose within a run (`stream` keeps the purposes apart;
/// `a`, `b` are e.g. the epoch and the batch index).
pub fn rng_for(seed: u64, stream: u64, a: u64, b: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix64(mix64(mix64(seed ^ stream.rotate_left(48)) ^ a) ^ b))
}

const SHUFFLE_STREAM: u64 = 1;
const AUGMENT_STREAM: u64 = 2;

/// How an epoch's batches are cut.
#[derive(Debug, Clone)]
pub struct EpochPlan {
    pub batch_size: usize,
    pub image_size: usize,
    pub train: bool,
    pub seed: u64,
    pub epoch: u64,
}

impl EpochPlan {
    pub fn num_batches(&self, split: &Split) -> usize {
        split.len().div_ceil(self.batch_size)
    }

    /// The epoch's order of images (shuffled for training).
    pub fn order(&self, split: &Split) -> Vec<u32> {
        let mut order: Vec<u32> = (0..split.len() as u32).collect();
        if self.train {
            order.shuffle(&mut rng_for(self.seed, SHUFFLE_STREAM, self.epoch, 0));
        }
        order
    }

    /// Builds batch `index` of the epoch from its slice of `order`.
    pub fn build(&self, split: &Split, aug: &Augmenter, order: &[u32], index: usize) -> Batch {
        let ids = &order[index * self.batch_size..((index + 1) * self.batch_size).min(order.len())];
        let n = aug.out_len();
        let mut images = vec![0f32; ids.len() * n];
        let mut labels = Vec::with_capacity(ids.len());
        let mut rng = rng_for(self.seed, AUGMENT_STREAM, self.epoch, index as u64);
        for (k, &i) in ids.iter().enumerate() {
            let (img, label) = split.get(i as usize);
            let cf = aug.draw(&mut rng);
            aug.apply(img, cf, &mut images[k * n..(k + 1) * n]);
            labels.push(label as i64);
        }
        Batch {
            images,
            labels,
            side: self.image_size,
        }
    }
}

/// Iterates an epoch's batches from `start` on, prepared `prefetch` batches ahead by
/// `workers` threads (batch i is made by worker i % workers, and read back in order).
pub struct Loader {
    receivers: Vec<Receiver<Batch>>,
    next: usize,
    end: usize,
    handles: Vec<JoinHandle<()>>,
}

impl Loader {
    pub fn new(
        split: Split,
        plan: EpochPlan,
        start: usize,
        workers: usize,
        prefetch: usize,
    ) -> Self {
        let workers = workers.max(1);
        let end = plan.num_batches(&split);
        let order = std::sync::Arc::new(plan.order(&split));
        let aug = Augmenter::new(split.set.side, plan.image_size, plan.train);
        let mut receivers = Vec::new();
        let mut handles = Vec::new();
        for w in 0..workers {
            let (tx, rx) = sync_channel(prefetch.div_ceil(workers).max(1));
            let (split, plan, order, aug) =
                (split.clone(), plan.clone(), order.clone(), aug.clone());
            handles.push(std::thread::spawn(move || {
                let mut i = start + (w + workers - start % workers) % workers;
                while i < end {
                    if tx.send(plan.build(&split, &aug, &order, i)).is_err() {
                        return; // the consumer stopped early
                    }
                    i += workers;
                }
            }));
            receivers.push(rx);
        }
        // receivers[k] serves batches with index % workers == k
        Self {
            receivers,
            next: start,
            end,
            handles,
        }
    }
}

impl Iterator for Loader {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.end {
            return None;
        }
        let rx = &self.receivers[self.next % self.receivers.len()];
        self.next += 1;
        rx.recv().ok()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.receivers.clear(); // unblocks the producers
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
