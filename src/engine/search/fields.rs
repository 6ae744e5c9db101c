//! The `TrainConfig` fields a search may set, and setting them.

use super::space::Value;
use crate::engine::model::Readout;
use crate::engine::train::{Schedule, TrainConfig};

/// What values a field takes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Int,
    Float,
    /// One of these names.
    Word(&'static [&'static str]),
}

/// Searchable fields, by their names in `TrainingConfig`. The epochs, the time budget and
/// the precision are the search's or the server's to set, not a trial's.
const FIELDS: &[(&str, Kind)] = &[
    ("image_size", Kind::Int),
    ("patch_size", Kind::Int),
    ("embed_dim", Kind::Int),
    ("chunk_size", Kind::Int),
    ("r", Kind::Int),
    ("num_layers", Kind::Int),
    ("num_heads", Kind::Int),
    ("ffn_dropout", Kind::Float),
    ("attn_dropout", Kind::Float),
    ("readout", Kind::Word(&["slow", "last-fast"])),
    ("batch_size", Kind::Int),
    ("micro_batch", Kind::Int),
    ("lr", Kind::Float),
    ("weight_decay", Kind::Float),
    ("schedule", Kind::Word(&["constant", "cosine"])),
    ("warmup_epochs", Kind::Float),
    ("min_lr_ratio", Kind::Float),
    ("label_smoothing", Kind::Float),
    ("seed", Kind::Int),
];

pub fn kind_of(field: &str) -> Option<Kind> {
    FIELDS.iter().find(|(n, _)| *n == field).map(|(_, k)| *k)
}

pub fn names() -> Vec<&'static str> {
    FIELDS.iter().map(|(n, _)| *n).collect()
}

/// Sets `field` of `config` to `value` (whose kind [`Space::parse`](super::Space::parse)
/// checked); the config's own validation judges the value.
pub fn apply(config: &mut TrainConfig, field: &str, value: &Value) -> Result<(), String> {
    let int = || match value {
        Value::Int(i) if *i >= 0 => Ok(*i as usize),
        _ => Err(format!("{field}: {value} is not a non-negative integer")),
    };
    let float = || {
        value
            .number()
            .ok_or(format!("{field}: {value} is not a number"))
    };
    let word = || match value {
        Value::Word(w) => Ok(w.as_str()),
        _ => Err(format!("{field}: {value} is not a name")),
    };
    let m = &mut config.model;
    match field {
        "image_size" => m.image_size = int()?,
        "patch_size" => m.patch_size = int()?,
        "embed_dim" => m.embed_dim = int()?,
        "chunk_size" => m.chunk_size = int()?,
        "r" => m.r = int()?,
        "num_layers" => m.num_layers = int()?,
        "num_heads" => m.num_heads = int()?,
        "ffn_dropout" => m.ffn_dropout = float()?,
        "attn_dropout" => m.attn_dropout = float()?,
        "readout" => m.readout = word()?.parse::<Readout>()?,
        "batch_size" => config.batch_size = int()?,
        "micro_batch" => config.micro_batch = int()?,
        "lr" => config.lr = float()?,
        "weight_decay" => config.weight_decay = float()?,
        "schedule" => {
            config.schedule = match word()? {
                "constant" => Schedule::Constant,
                "cosine" => Schedule::Cosine,
                w => return Err(format!("schedule: unknown schedule '{w}'")),
            }
        }
        "warmup_epochs" => config.warmup_epochs = float()?,
        "min_lr_ratio" => config.min_lr_ratio = float()?,
        "label_smoothing" => config.label_smoothing = float()?,
        "seed" => config.seed = int()? as u64,
        other => return Err(format!("{other}: not a searchable field")),
    }
    Ok(())
}
