//! TensorBoard event files (`--report-to tensorboard`): every `metrics.jsonl` row as
//! scalars under the tags transformers' Trainer and TRL use, and the run's configuration as
//! a text summary, in `RUN/runs/<name>/events.out.tfevents.<secs>.<host>.<pid>.0`.
//!
//! The file format is TensorFlow's TFRecord framing (`tensorflow/core/lib/io/record_writer.cc`):
//! per record a u64 little-endian length, the masked CRC32C of those 8 bytes, the data and
//! the masked CRC32C of the data. Each record is an `Event` protobuf
//! (`tensorflow/core/util/event.proto`, `summary.proto`). The few fields we write are
//! encoded by hand below: the Rust crates for this (`tensorboard-rs`, `tboard`) have had no
//! release for years and pull in a protobuf code generator for five messages.
//!
//! A resumed run appends a new file in the same directory that starts with a
//! `SessionLog START` at the resumed step: TensorBoard then drops the killed run's events
//! from that step on, as `metrics.jsonl` drops its rows ([`crate::metrics_writer::MetricsWriter::resume`]).
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

use crate::metrics::MetricsRow;

/// The file name prefix TensorBoard looks for.
pub const FILE_PREFIX: &str = "events.out.tfevents.";
/// The folder under the run directory (transformers' default `logging_dir` is `OUTPUT/runs/...`).
pub const RUNS_DIR: &str = "runs";

/// One open event file.
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// A new event file in `dir` (created), starting with the file-version event.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let now = wall_time();
        // torch.utils.tensorboard's name: seconds, host, pid, a per-process counter (two
        // files of one process in one second, a resumed sweep candidate, get two names).
        static FILES: AtomicU32 = AtomicU32::new(0);
        let name = format!("{FILE_PREFIX}{:010}.{}.{}.{}", now as u64, hostname(), std::process::id(), FILES.fetch_add(1, Ordering::Relaxed));
        let path = dir.join(name);
        let file = File::options().write(true).create_new(true).open(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = EventWriter { path, file };
        let mut ev = Vec::new();
        put_double(&mut ev, 1, now);
        put_bytes(&mut ev, 3, b"brain.Event:2");
        w.write_record(&ev)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Scalars of one step, in one event.
    pub fn scalars(&mut self, step: i64, values: &[(String, f32)]) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut value = Vec::new();
            put_bytes(&mut value, 1, tag.as_bytes());
            put_fixed32(&mut value, 2, v.to_bits());
            put_bytes(&mut summary, 1, &value);
        }
        self.write_event(step, 5, &summary)
    }

    /// A text summary (what `SummaryWriter.add_text(tag, text)` writes: a string tensor
    /// under `TAG/text_summary` with the text plugin's metadata).
    pub fn text(&mut self, step: i64, tag: &str, text: &str) -> Result<()> {
        let mut plugin = Vec::new();
        put_bytes(&mut plugin, 1, b"text");
        let mut metadata = Vec::new();
        put_bytes(&mut metadata, 1, &plugin);
        let mut dim = Vec::new();
        put_varint_field(&mut dim, 1, 1);
        let mut shape = Vec::new();
        put_bytes(&mut shape, 2, &dim);
        let mut tensor = Vec::new();
        put_varint_field(&mut tensor, 1, 7); // DT_STRING
        put_bytes(&mut tensor, 2, &shape);
        put_bytes(&mut tensor, 8, text.as_bytes());
        let mut value = Vec::new();
        put_bytes(&mut value, 1, format!("{tag}/text_summary").as_bytes());
        put_bytes(&mut value, 9, &metadata);
        put_bytes(&mut value, 8, &tensor);
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &value);
        self.write_event(step, 5, &summary)
    }

    /// `SessionLog { status: START }` at `step`: TensorBoard discards the events of earlier
    /// files at this step and later (a resumed run rewrites them).
    pub fn session_start(&mut self, step: i64) -> Result<()> {
        let mut log = Vec::new();
        put_varint_field(&mut log, 1, 1);
        self.write_event(step, 7, &log)
    }

    fn write_event(&mut self, step: i64, field: u32, message: &[u8]) -> Result<()> {
        let mut ev = Vec::new();
        put_double(&mut ev, 1, wall_time());
        put_varint_field(&mut ev, 2, step as u64);
        put_bytes(&mut ev, field, message);
        self.write_record(&ev)
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc(data).to_le_bytes());
        // One write per record and a flush: a reader (TensorBoard, while the run trains) sees
        // whole records, and a killed run leaves at most one torn record at the end.
        self.file.write_all(&rec).and_then(|_| self.file.flush()).with_context(|| format!("writing {}", self.path.display()))
    }
}

/// The TensorBoard side of a run's metrics: opened by [`crate::metrics_writer::MetricsWriter`]
/// when `--report-to tensorboard` is given.
pub struct Reporter {
    writer: EventWriter,
}

impl Reporter {
    /// A new event file in `RUN/runs/<name>/` with the configuration as text at step 0,
    /// or (a resumed run, `resumed_at` = its checkpoint's step) a session start there.
    pub fn start(run_dir: &Path, name: &str, config: &serde_json::Value, resumed_at: Option<usize>) -> Result<Self> {
        let mut writer = EventWriter::create(&run_dir.join(RUNS_DIR).join(name))?;
        match resumed_at {
            // The rows after the checkpoint are written again, from step + 1.
            Some(step) => writer.session_start(step as i64 + 1)?,
            None => writer.text(0, "args", &serde_json::to_string_pretty(config)?)?,
        }
        Ok(Reporter { writer })
    }

    pub fn path(&self) -> &Path {
        self.writer.path()
    }

    pub fn write(&mut self, row: &MetricsRow) -> Result<()> {
        let values = scalars(row);
        if values.is_empty() {
            return Ok(());
        }
        self.writer.scalars(row.step as i64, &values)
    }
}

/// Every number of a metrics row under its TensorBoard tag (see [`tag`]).
pub fn scalars(row: &MetricsRow) -> Vec<(String, f32)> {
    let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(row) else { return Vec::new() };
    fields.iter().filter(|(k, _)| k.as_str() != "step").filter_map(|(k, v)| Some((tag(k), v.as_f64()? as f32))).collect()
}

/// The tag of a `metrics.jsonl` key: `eval_X` goes under `eval/`, the rest under `train/`,
/// with the name transformers' Trainer or TRL's trainers log for the same quantity
/// (`lr` is `train/learning_rate`, DPO's `rewards_margin` is `train/rewards/margins`,
/// GRPO's `rewards_EVALUATOR` is `train/rewards/EVALUATOR/mean`).
pub fn tag(key: &str) -> String {
    let (prefix, name) = match key.strip_prefix("eval_") {
        Some(rest) => ("eval", rest),
        None => ("train", key),
    };
    let renamed = match name {
        "lr" => "learning_rate",
        "tokens" => "num_tokens",
        "rewards_accuracy" => "rewards/accuracies",
        "rewards_margin" => "rewards/margins",
        "rewards_chosen" => "rewards/chosen",
        "rewards_rejected" => "rewards/rejected",
        "logps_chosen" => "logps/chosen",
        "logps_rejected" => "logps/rejected",
        "completion_length_mean" => "completions/mean_length",
        "completion_length_min" => "completions/min_length",
        "completion_length_max" => "completions/max_length",
        "clipped_ratio" => "completions/clipped_ratio",
        "clip_ratio_low" => "clip_ratio/low_mean",
        "clip_ratio_high" => "clip_ratio/high_mean",
        "clip_ratio_region" => "clip_ratio/region_mean",
        // GRPO's per-evaluator mean reward (the DPO `rewards_*` keys are matched above).
        other => match other.strip_prefix("rewards_") {
            Some(evaluator) => return format!("{prefix}/rewards/{evaluator}/mean"),
            None => other,
        },
    };
    format!("{prefix}/{renamed}")
}

/// One event read back by [`read_events`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    pub file_version: Option<String>,
    /// (tag, simple_value) of a scalar summary.
    pub scalars: Vec<(String, f32)>,
    /// (tag, text) of a text summary.
    pub texts: Vec<(String, String)>,
    /// A `SessionLog` status (1 = START).
    pub session_status: Option<u64>,
}

/// Every record of an event file, both CRCs checked, decoded as far as this module writes.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut events = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let Some(head) = bytes.get(at..at + 12) else { bail!("{}: a torn record header at byte {at}", path.display()) };
        let len_bytes = &head[..8];
        let len = u64::from_le_bytes(len_bytes.try_into()?) as usize;
        if u32::from_le_bytes(head[8..12].try_into()?) != masked_crc(len_bytes) {
            bail!("{}: the length CRC of the record at byte {at} does not match", path.display());
        }
        // The length is checked by its CRC, but a damaged file may still claim anything.
        let end = (at + 12).checked_add(len).filter(|&e| e <= bytes.len()).with_context(|| format!("{}: the record at byte {at} is cut short", path.display()))?;
        let data = &bytes[at + 12..end];
        let Some(crc) = bytes.get(end..end + 4) else { bail!("{}: the record at byte {at} has no data CRC", path.display()) };
        if u32::from_le_bytes(crc.try_into()?) != masked_crc(data) {
            bail!("{}: the data CRC of the record at byte {at} does not match", path.display());
        }
        events.push(decode_event(data).with_context(|| format!("{}: the record at byte {at}", path.display()))?);
        at = end + 4;
    }
    Ok(events)
}

fn decode_event(data: &[u8]) -> Result<Event> {
    let mut ev = Event::default();
    for (field, value) in Fields::new(data) {
        match (field?, value) {
            (1, Value::Fixed64(v)) => ev.wall_time = f64::from_bits(v),
            (2, Value::Varint(v)) => ev.step = v as i64,
            (3, Value::Bytes(b)) => ev.file_version = Some(String::from_utf8_lossy(b).into_owned()),
            (5, Value::Bytes(summary)) => {
                for (f, v) in Fields::new(summary) {
                    if let (1, Value::Bytes(value)) = (f?, v) {
                        decode_value(value, &mut ev)?;
                    }
                }
            }
            (7, Value::Bytes(log)) => {
                for (f, v) in Fields::new(log) {
                    if let (1, Value::Varint(s)) = (f?, v) {
                        ev.session_status = Some(s);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(ev)
}

fn decode_value(data: &[u8], ev: &mut Event) -> Result<()> {
    let (mut tag, mut simple, mut text) = (String::new(), None, None);
    for (f, v) in Fields::new(data) {
        match (f?, v) {
            (1, Value::Bytes(b)) => tag = String::from_utf8_lossy(b).into_owned(),
            (2, Value::Fixed32(bits)) => simple = Some(f32::from_bits(bits)),
            (8, Value::Bytes(tensor)) => {
                for (tf, tv) in Fields::new(tensor) {
                    if let (8, Value::Bytes(s)) = (tf?, tv) {
                        text = Some(String::from_utf8_lossy(s).into_owned());
                    }
                }
            }
            _ => {}
        }
    }
    match (simple, text) {
        (Some(v), _) => ev.scalars.push((tag, v)),
        (None, Some(t)) => ev.texts.push((tag, t)),
        (None, None) => bail!("summary value `{tag}` has neither a simple_value nor a string tensor"),
    }
    Ok(())
}

// ---- the protobuf wire format, as much as the messages above need ---------------------

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire_type));
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_key(out, field, 0);
    put_varint(out, v);
}

fn put_double(out: &mut Vec<u8>, field: u32, v: f64) {
    put_key(out, field, 1);
    out.extend_from_slice(&v.to_bits().to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_fixed32(out: &mut Vec<u8>, field: u32, bits: u32) {
    put_key(out, field, 5);
    out.extend_from_slice(&bits.to_le_bytes());
}

enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// The (field number, value) pairs of one message; a malformed one ends the iteration
/// with an error.
struct Fields<'a> {
    data: &'a [u8],
    at: usize,
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(data: &'a [u8]) -> Self {
        Fields { data, at: 0, failed: false }
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.data.get(self.at) else { bail!("a varint runs past the end of the message") };
            self.at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        bail!("a varint longer than 10 bytes")
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let Some(b) = self.data.get(self.at..self.at + n) else { bail!("a field runs past the end of the message") };
        self.at += n;
        Ok(b)
    }

    fn field(&mut self) -> Result<(u32, Value<'a>)> {
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => Value::Fixed64(u64::from_le_bytes(self.take(8)?.try_into()?)),
            2 => {
                let n = self.varint()? as usize;
                Value::Bytes(self.take(n)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(self.take(4)?.try_into()?)),
            w => bail!("wire type {w} is not used by event files"),
        };
        Ok(((key >> 3) as u32, value))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = (Result<u32>, Value<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.at >= self.data.len() {
            return None;
        }
        match self.field() {
            Ok((f, v)) => Some((Ok(f), v)),
            Err(e) => {
                self.failed = true;
                Some((Err(e), Value::Varint(0)))
            }
        }
    }
}

/// TFRecord's masked CRC32C (`tensorflow/core/lib/hash/crc32c.h`, `Mask`): rotated and
/// offset, so a CRC stored in data that is itself checksummed does not cancel out.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn wall_time() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The host name as a file-name part (only characters that are safe in one).
fn hostname() -> String {
    let clean: String = crate::jobs::process::hostname().chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).collect();
    if clean.is_empty() { "localhost".into() } else { clean }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // crc32c("123456789") = 0xE3069283 (RFC 3720's check value); masked per TF's formula.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xE306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8));
    }

    #[test]
    fn tags_follow_transformers_and_trl() {
        assert_eq!(tag("loss"), "train/loss");
        assert_eq!(tag("lr"), "train/learning_rate");
        assert_eq!(tag("grad_norm"), "train/grad_norm");
        assert_eq!(tag("epoch"), "train/epoch");
        assert_eq!(tag("eval_loss"), "eval/loss");
        assert_eq!(tag("rewards_margin"), "train/rewards/margins");
        assert_eq!(tag("eval_rewards_accuracy"), "eval/rewards/accuracies");
        assert_eq!(tag("reward_std"), "train/reward_std");
        assert_eq!(tag("rewards_numeric"), "train/rewards/numeric/mean");
        assert_eq!(tag("completion_length_mean"), "train/completions/mean_length");
        assert_eq!(tag("clip_ratio_region"), "train/clip_ratio/region_mean");
    }

    #[test]
    fn rows_written_are_read_back_with_checked_crcs() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let cfg = serde_json::json!({"learning_rate": 1e-3});
        let mut rep = Reporter::start(dir.path(), "default", &cfg, None)?;
        let mut extra = std::collections::BTreeMap::new();
        extra.insert("rewards_margin".to_string(), serde_json::json!(0.25));
        rep.write(&MetricsRow { step: 0, eval_loss: Some(3.0), ..Default::default() })?;
        rep.write(&MetricsRow { step: 1, loss: Some(2.5), lr: Some(1e-3), grad_norm: Some(0.5), tokens: 10, elapsed_s: 0.1, extra, ..Default::default() })?;
        let path = rep.path().to_path_buf();
        assert!(path.starts_with(dir.path().join("runs/default")));
        assert!(path.file_name().unwrap().to_str().unwrap().starts_with(FILE_PREFIX));
        let events = read_events(&path)?;
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!(events[1].texts[0].0, "args/text_summary");
        assert!(events[1].texts[0].1.contains("learning_rate"));
        assert_eq!(events[2].step, 0);
        assert!(events[2].scalars.contains(&("eval/loss".to_string(), 3.0)), "{:?}", events[2].scalars);
        assert!(!events[2].scalars.iter().any(|(t, _)| t == "train/loss"), "no train loss before the first step");
        let step1: std::collections::BTreeMap<_, _> = events[3].scalars.iter().cloned().collect();
        assert_eq!(events[3].step, 1);
        assert_eq!(step1["train/loss"], 2.5);
        assert_eq!(step1["train/learning_rate"], 1e-3);
        assert_eq!(step1["train/grad_norm"], 0.5);
        assert_eq!(step1["train/rewards/margins"], 0.25);
        assert_eq!(step1["train/num_tokens"], 10.0);

        // A flipped byte anywhere is caught by a CRC.
        let mut bytes = std::fs::read(&path)?;
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        std::fs::write(&path, &bytes)?;
        assert!(format!("{:#}", read_events(&path).unwrap_err()).contains("CRC"));

        // A resumed run: a second file that starts with a session start after the checkpoint.
        let rep = Reporter::start(dir.path(), "default", &cfg, Some(1))?;
        let resumed = read_events(rep.path())?;
        assert_eq!((resumed[1].session_status, resumed[1].step), (Some(1), 2));
        Ok(())
    }
}
