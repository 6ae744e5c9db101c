//! Training: recipes, the loop, evaluation, checkpoints and export.

mod adamw;
mod checkpoint;
mod ckpt_dir;
mod config;
mod eval;
mod events;
mod export;
mod import;
mod memory;
mod run_dir;
mod step;
mod trainer;

pub use adamw::{adamw, TlbAdamW};
pub use checkpoint::{
    load_record, record_bytes, remove_stale_temp_files, write_atomic, write_json, Checkpoint,
    CheckpointMeta, Skipped, CORRUPT_SUFFIX,
};
pub use ckpt_dir::{CheckpointDir, Resume, Start};
pub use config::{Preset, Schedule, TrainConfig};
pub use eval::{batch_tensors, cpu_threads, evaluate, forward_sharded, loss_and_correct};
pub use events::{
    ChannelObserver, EpochMetrics, FinalMetrics, FnObserver, Outcome, Progress, SavedKind,
    TrainEvent, TrainObserver,
};
pub use export::{checkpoint_safetensors, export_safetensors, named_tensors, NamedTensor};
pub use import::{import_safetensors, ImportError, Imported, MAX_HEADER_BYTES};
pub use memory::{human_bytes, param_count, Footprint};
pub use run_dir::{read_epochs_text, RunDir};
pub use step::{gradient_model, replica, step_grads, step_grads_with, StepGrads};
pub use trainer::{train, train_run, Run};
