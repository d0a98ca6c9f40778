//! Segment files: their names, listing them, starting one, and what each
//! holds as the writer tracks it.
//!
//! Owns the file layout: segment files `stream-NNNNNNNN.log` under the
//! log's directory, each opening with [`MAGIC`], numbered upwards; the
//! oldest go first once nothing live is read from them (see
//! [`super::writer`]). A segment that goes may be kept as a spare,
//! `spare-NNNNNNNN.log`, whose blocks the next segment reuses: overwriting
//! blocks the file already has makes each group commit's `fdatasync`
//! cheaper than after an append, which also allocates blocks and grows the
//! file (issue #18). A spare written through the page cache is zeroed
//! first (see `zero`); one written past it (see [`super::head_file`]) is
//! written over as it is. Recovery never reads a spare. Must not read or
//! write records.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{LogError, io_err};
use crate::ids::RunId;
use crate::stream::StreamEpoch;

/// The first bytes of every segment; the last byte is the format version.
/// Version 2 masks each record's checksum with its segment's number
/// ([`crc_mask`]), so the old records of a reused file never read as its
/// own.
pub(super) const MAGIC: &[u8; 8] = b"RGSLOG\x00\x02";
/// Version 1 (earlier builds): checksums unmasked. Still replayed.
pub(super) const MAGIC_V1: &[u8; 8] = b"RGSLOG\x00\x01";

/// Spares kept for reuse at most (each the size of a segment).
pub(super) const MAX_SPARES: usize = 2;

/// What the checksums of segment `n`'s records are XORed with (format
/// version 2). A bijection of the number's low 32 bits (an odd
/// multiplier), so two segments' masks differ unless their numbers are
/// 2^32 apart, and no segment's is 0 (version 1's). A reused file's old
/// records carry an older number's mask: to recovery each is a bad record,
/// the end of what was written.
pub(super) fn crc_mask(n: u64) -> u32 {
    (n as u32).wrapping_mul(0x9E37_79B1)
}

pub(super) fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("stream-{n:08}.log"))
}

pub(super) fn spare_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("spare-{n:08}.log"))
}

/// The segment numbers in `dir`, ascending.
pub(super) fn segments(dir: &Path) -> Result<Vec<u64>, LogError> {
    numbered(dir, "stream-")
}

/// The spares in `dir`, ascending by the number they had.
pub(super) fn spares(dir: &Path) -> Result<Vec<u64>, LogError> {
    numbered(dir, "spare-")
}

fn numbered(dir: &Path, prefix: &str) -> Result<Vec<u64>, LogError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
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

fn sync_dir(path: &Path) -> Result<(), LogError> {
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    Ok(())
}

/// Creates (or empties) the segment at `path` with its magic, synced, its
/// name too.
pub(super) fn write_new_segment(path: &Path) -> Result<(), LogError> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all(MAGIC).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))?;
    // The new name must survive a crash too.
    sync_dir(path)
}

/// Makes the spare at `spare` the segment at `path`: its magic, then the
/// name. With `zero`, for a file written through the page cache, its
/// blocks are zeroed first (see [`zero`]; where that fails, it is emptied);
/// a file written past the cache keeps its old bytes as they are. Either
/// way old records never read as the new segment's: their checksums
/// carry another number's mask.
pub(super) fn reuse_spare(spare: &Path, path: &Path, zero_first: bool) -> Result<(), LogError> {
    let file = OpenOptions::new()
        .write(true)
        .open(spare)
        .map_err(io_err(spare))?;
    if zero_first {
        let len = file.metadata().map_err(io_err(spare))?.len();
        if !zero(&file, len) {
            // Nothing to gain from the old blocks: start it as a new file.
            file.set_len(0).map_err(io_err(spare))?;
        }
    }
    file.write_all_at(MAGIC, 0).map_err(io_err(spare))?;
    // The zeros and the magic are on disk before the name is.
    file.sync_all().map_err(io_err(spare))?;
    fs::rename(spare, path).map_err(io_err(path))?;
    sync_dir(path)
}

/// Deletes segment `n` (which holds nothing live), its name too.
pub(super) fn delete_segment(dir: &Path, n: u64) -> Result<(), LogError> {
    let path = segment_path(dir, n);
    fs::remove_file(&path).map_err(io_err(&path))?;
    sync_dir(&path)
}

/// Keeps segment `n` (which holds nothing live) as a spare.
pub(super) fn keep_as_spare(dir: &Path, n: u64) -> Result<PathBuf, LogError> {
    let (from, to) = (segment_path(dir, n), spare_path(dir, n));
    fs::rename(&from, &to).map_err(io_err(&from))?;
    sync_dir(&to)?;
    Ok(to)
}

/// Turns the whole of `file` into zeros the filesystem knows are zeros
/// (unwritten extents: blocks kept, no data written, its cached pages
/// dropped). False where the filesystem cannot.
///
/// Why not write over the old bytes as they are: a write that ends inside
/// a page the cache does not hold reads that page from the disk first, and
/// a cached one is written back (and counted in `/proc/PID/io`) as a whole
/// large folio, old bytes included. Measured here, 330 KiB written then
/// `fdatasync`ed: appended 426-551 us, over cached old bytes 237-247 us
/// (`write_bytes` 4.1x), over dropped ones 381-498 us (8 KiB read per
/// write), over zeroed ones 332-340 us (1.0x, nothing read).
fn zero(file: &File, len: u64) -> bool {
    #[cfg(target_os = "linux")]
    {
        let Ok(len) = libc::off_t::try_from(len) else {
            return false;
        };
        // SAFETY: a plain syscall on a descriptor `file` owns for the
        // call; it reads and writes no memory of ours.
        let zeroed = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                len,
            )
        };
        zeroed == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, len);
        false
    }
}

/// One segment file as the writer tracks it, to know when it may go.
#[derive(Debug)]
pub(super) struct Segment {
    pub(super) number: u64,
    /// Bytes of records (and magic) in the file; a reused file may be
    /// longer, the rest its old records.
    pub(super) bytes: u64,
    /// What its records' checksums are XORed with: [`crc_mask`] of its
    /// number, or 0 in a version 1 segment.
    pub(super) mask: u32,
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
            mask: crc_mask(number),
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
