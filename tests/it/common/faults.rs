//! Damage for fault tests: rotten bytes and poisoned weights.

use std::path::Path;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::Tensor;
use tlb::engine::backend::{cpu_device, CpuAutodiff};
use tlb::engine::train::{record_bytes, Checkpoint};

/// Overwrites 4 KiB in the middle of a file with pseudo-random bytes (its size unchanged).
pub fn corrupt(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    assert!(
        bytes.len() > 8192,
        "{} is too small to corrupt",
        path.display()
    );
    let mid = bytes.len() / 2;
    let mut x = 0x9e3779b97f4a7c15u64;
    for b in &mut bytes[mid - 2048..mid + 2048] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(path, bytes).unwrap();
}

struct Poison;

impl<B: burn::tensor::backend::Backend> ModuleMapper<B> for Poison {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.map(|t| t.mul_scalar(f32::NAN))
    }
}

/// Rewrites a checkpoint with NaN weights and a valid checksum (as a diverged run would).
pub fn poison(path: &Path) {
    let mut ckpt = Checkpoint::read(path).unwrap();
    let model = ckpt
        .load_model::<CpuAutodiff>(&cpu_device())
        .unwrap()
        .map(&mut Poison);
    ckpt.model = record_bytes::<CpuAutodiff, _>(model.into_record()).unwrap();
    ckpt.write(path).unwrap();
}
