//! Segment files: their names, listing them, starting one, and what each
//! holds as the writer tracks it.
//!
//! Owns the file layout: segment files `stream-NNNNNNNN.log` under the
//! log's directory, each opening with [`MAGIC`], numbered upwards; the
//! oldest go first once nothing live is read from them (see
//! [`super::writer`]). Must not read or write records.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{LogError, io_err};
use crate::ids::RunId;
use crate::stream::StreamEpoch;

/// The first bytes of every segment; the last byte is the format version.
pub(super) const MAGIC: &[u8; 8] = b"RGSLOG\x00\x01";

pub(super) fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("stream-{n:08}.log"))
}

/// The segment numbers in `dir`, ascending.
pub(super) fn segments(dir: &Path) -> Result<Vec<u64>, LogError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix("stream-"))
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        found.push(n);
    }
    found.sort_unstable();
    Ok(found)
}

/// Creates (or empties) the segment at `path` with its magic, synced, its
/// name too.
pub(super) fn write_new_segment(path: &Path) -> Result<File, LogError> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all(MAGIC).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        // The new name must survive a crash too.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    Ok(file)
}

/// One segment file as the writer tracks it, to know when it may go.
#[derive(Debug)]
pub(super) struct Segment {
    pub(super) number: u64,
    /// Bytes in the file.
    pub(super) bytes: u64,
    /// Every run with a record here: the epoch and the end offset of its
    /// last record here. The segment holds nothing a ring still keeps once
    /// each of these rings is gone, has another epoch, or has evicted
    /// everything below the end.
    pub(super) runs: HashMap<RunId, (StreamEpoch, u64)>,
}

impl Segment {
    pub(super) fn new(number: u64, bytes: u64) -> Segment {
        Segment {
            number,
            bytes,
            runs: HashMap::new(),
        }
    }

    pub(super) fn note(&mut self, run: RunId, epoch: StreamEpoch, end: u64) {
        match self.runs.entry(run) {
            Entry::Occupied(mut e) => {
                let seen = e.get_mut();
                if seen.0 == epoch {
                    seen.1 = seen.1.max(end);
                } else {
                    *seen = (epoch, end);
                }
            }
            Entry::Vacant(e) => {
                e.insert((epoch, end));
            }
        }
    }
}
