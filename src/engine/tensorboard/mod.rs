//! TensorBoard event files: a run writes its scalars (per epoch, and every few steps), its
//! hyper-parameters and final figures (the HParams view) and, each epoch, the attention
//! picture of a fixed validation image. TensorBoard pointed at a folder shows each folder
//! holding event files as a run. The format is TFRecord framing ([`record`]) around `Event`
//! protobufs ([`proto`]).

pub mod record;
mod run;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use prost::Message;

pub use run::{attention_png, hparams_of, Picture, RunLog, ATTENTION_TAG, STEP_EVERY};

/// TensorBoard's event messages (`proto/tensorboard/`).
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/tensorboard.rs"));
    pub mod hparams {
        include!(concat!(env!("OUT_DIR"), "/tensorboard.hparams.rs"));
    }
}

use proto::event::What;
use proto::hparams::{h_params_plugin_data, HParamsPluginData, SessionEndInfo, SessionStartInfo};
use proto::summary::value::Value as Kind;
use proto::summary::{Image, Value};
use proto::{Event, SessionLog, Summary, SummaryMetadata};

pub use proto::hparams::Status;

/// What names an event file: TensorBoard reads the files of a folder whose names hold this,
/// in name order.
pub const FILE_MARK: &str = "tfevents";

/// Seconds since the Unix epoch.
fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One event file, appended to record by record; each record is written whole in one call,
/// so a file a crash cut ends in at most one partial record, which readers skip.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir`, named
    /// `events.out.tfevents.<seconds>.<nanoseconds>.<host>.<suffix>` (the time first: a later
    /// file sorts after an earlier one), its version record first.
    pub fn create(dir: &Path, suffix: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let now = wall_time();
        let (secs, nanos) = (now.trunc() as u64, (now.fract() * 1e9) as u64);
        let host = hostname();
        let name = format!("events.out.{FILE_MARK}.{secs:010}.{nanos:09}.{host}.{suffix}");
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut w = Self { file, path };
        w.write(Event {
            wall_time: now,
            step: 0,
            what: Some(What::FileVersion("brain.Event:2".into())),
        })?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: Event) -> Result<()> {
        self.file
            .write_all(&record::frame(&event.encode_to_vec()))
            .with_context(|| format!("writing {}", self.path.display()))
    }

    fn summary(&mut self, step: u64, value: Vec<Value>) -> Result<()> {
        self.write(Event {
            wall_time: wall_time(),
            step: step as i64,
            what: Some(What::Summary(Summary { value })),
        })
    }

    /// Scalars at `step`, one event.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let values = values
            .iter()
            .map(|(tag, v)| Value {
                tag: (*tag).into(),
                metadata: None,
                value: Some(Kind::SimpleValue(*v as f32)),
            })
            .collect();
        self.summary(step, values)
    }

    /// An RGB PNG at `step`.
    pub fn image(
        &mut self,
        step: u64,
        tag: &str,
        png: Vec<u8>,
        width: u32,
        height: u32,
    ) -> Result<()> {
        let image = Image {
            height: height as i32,
            width: width as i32,
            colorspace: 3,
            encoded_image_string: png,
        };
        self.summary(
            step,
            vec![Value {
                tag: tag.into(),
                metadata: None,
                value: Some(Kind::Image(image)),
            }],
        )
    }

    /// A run (re)starting at `step`: TensorBoard drops what this run logged after it before
    /// (an attempt that crashed past its last checkpoint).
    pub fn session_start(&mut self, step: u64) -> Result<()> {
        self.write(Event {
            wall_time: wall_time(),
            step: step as i64,
            what: Some(What::SessionLog(SessionLog {
                status: proto::session_log::SessionStatus::Start as i32,
                ..Default::default()
            })),
        })
    }

    /// The run's hyper-parameters, for TensorBoard's HParams view.
    pub fn hparams(
        &mut self,
        hparams: BTreeMap<String, prost_types::Value>,
        model_uri: &str,
    ) -> Result<()> {
        let start = h_params_plugin_data::Data::SessionStartInfo(SessionStartInfo {
            hparams: hparams.into_iter().collect(),
            model_uri: model_uri.into(),
            group_name: String::new(),
            start_time_secs: wall_time(),
        });
        self.plugin_data("_hparams_/session_start_info", start)
    }

    /// How the run ended, for the HParams view.
    pub fn session_end(&mut self, status: Status) -> Result<()> {
        let end = h_params_plugin_data::Data::SessionEndInfo(SessionEndInfo {
            status: status as i32,
            end_time_secs: wall_time(),
        });
        self.plugin_data("_hparams_/session_end_info", end)
    }

    fn plugin_data(&mut self, tag: &str, data: h_params_plugin_data::Data) -> Result<()> {
        let content = HParamsPluginData {
            version: 0,
            data: Some(data),
        };
        let metadata = SummaryMetadata {
            plugin_data: Some(proto::summary_metadata::PluginData {
                plugin_name: "hparams".into(),
                content: content.encode_to_vec(),
            }),
            ..Default::default()
        };
        // An empty float tensor (TensorBoard's own hparams summaries carry this one): its
        // data loading keeps tensor values only.
        let tensor = proto::TensorProto {
            dtype: proto::DataType::DtFloat as i32,
            tensor_shape: Some(proto::TensorShapeProto {
                dim: vec![proto::tensor_shape_proto::Dim {
                    size: 0,
                    name: String::new(),
                }],
            }),
            float_val: Vec::new(),
        };
        self.summary(
            0,
            vec![Value {
                tag: tag.into(),
                metadata: Some(metadata),
                value: Some(Kind::Tensor(tensor)),
            }],
        )
    }

    /// Flushes the file to disk (at the end of an epoch).
    pub fn sync(&mut self) -> Result<()> {
        self.file.sync_data().context("syncing an event file")
    }
}

/// The host's name as a file-name part: letters, digits and `-` only.
fn hostname() -> String {
    crate::host::host_name()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect()
}

/// The events of an event file, up to its last whole record.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    record::records(&bytes)
        .into_iter()
        .map(|r| {
            Event::decode(r).with_context(|| format!("decoding an event in {}", path.display()))
        })
        .collect()
}

/// The event files in `dir`, in the order TensorBoard reads them.
pub fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains(FILE_MARK))
        })
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests;
