//! The head segment's file as the writer appends to it: buffered, written
//! in whole blocks at aligned offsets, and under `--stream-sync always`
//! past the page cache (`O_DIRECT`).
//!
//! Owns the bytes between a record being written and their reaching the
//! file, and the file's length. Must not know what the bytes are.
//!
//! Why direct: under `always` every group is synced before it is
//! acknowledged, so the page cache only adds work: a copy into it, dirty
//! pages to find and write back at `fdatasync`, and on a reused file
//! (whose blocks were zeroed to keep cached old pages out, see
//! [`super::segment`]) the unwritten extents to convert, which made every
//! sync write the inode and the extent blocks too, three I/Os one after
//! another. Measured on this project's machine (ext4, virtio, write-back
//! cache), 225 KiB per group written then `fdatasync`ed: buffered over
//! zeroed blocks 340-351 us and 172-206 us of CPU per group; direct over
//! written blocks 184-217 us and 34-69 us. Under `os` and `interval` the
//! acknowledgement comes before the disk, and the cache is what makes
//! that fast: those stay buffered.
//!
//! A direct write must start and end on a block boundary, so a group that
//! ends inside a block is written padded with zeros, and that block is
//! kept and written again, its earlier bytes unchanged, with the next
//! group. A crash leaves at most the zeros past the last record (replay
//! cuts them as a torn tail), and rewriting a block never changes a byte
//! already acknowledged, so a torn rewrite loses nothing acknowledged.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The unit of a direct write: offsets, lengths and the buffer's address
/// are multiples of it. 4 KiB covers the usual logical block sizes (512
/// B and 4 KiB) and is the page size.
const BLOCK: usize = 4096;

/// A buffer whose start is block-aligned, in safe code: a `Vec` one block
/// longer than asked, used from its first aligned byte.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    capacity: usize,
}

impl AlignedBuf {
    fn new(capacity: usize) -> AlignedBuf {
        let storage = vec![0u8; capacity + BLOCK];
        let start = storage.as_ptr().align_offset(BLOCK);
        AlignedBuf {
            storage,
            start,
            capacity,
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.capacity]
    }
}

/// The open head segment. Every write goes through here.
pub(super) struct HeadFile {
    file: File,
    direct: bool,
    buf: AlignedBuf,
    /// The file offset of the buffer's first byte (a block boundary when
    /// direct).
    base: u64,
    /// Bytes in the buffer. When direct, the first of them may already be
    /// in the file (the start of a block written padded), unchanged.
    filled: usize,
    /// How many of them are in the file already: nothing to write until
    /// more come.
    on_disk: usize,
    /// The file's length: past the records when the file is a reused
    /// spare (its old records) or after a padded write.
    len: u64,
}

impl HeadFile {
    /// Opens `path` to append at byte `at`, past the page cache if
    /// `direct` and the filesystem allows it (otherwise buffered), with a
    /// buffer of `capacity` bytes (rounded up to whole blocks).
    pub(super) fn open(
        path: &Path,
        at: u64,
        direct: bool,
        capacity: usize,
    ) -> io::Result<HeadFile> {
        let capacity = capacity.max(BLOCK).next_multiple_of(BLOCK);
        let (file, direct) = open_file(path, direct)?;
        let len = file.metadata()?.len();
        let base = if direct { at - at % BLOCK as u64 } else { at };
        let filled = (at - base) as usize;
        let mut head = HeadFile {
            file,
            direct,
            buf: AlignedBuf::new(capacity),
            base,
            filled,
            on_disk: filled,
            len,
        };
        if filled > 0 {
            head.read_partial_block()?;
        }
        Ok(head)
    }

    /// Reads the bytes of the block `at` falls in that come before it (only
    /// when direct: the next write rewrites that block whole).
    fn read_partial_block(&mut self) -> io::Result<()> {
        let (base, want) = (self.base, self.filled);
        // A direct read must be a whole block into an aligned buffer; it
        // ends short only at the end of the file.
        let got = self.file.read_at(&mut self.buf.bytes()[..BLOCK], base)?;
        if got < want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the head segment is shorter than its records",
            ));
        }
        Ok(())
    }

    /// Whether writes bypass the page cache.
    pub(super) fn is_direct(&self) -> bool {
        self.direct
    }

    /// The file's length as it will be once the buffer is written.
    pub(super) fn len(&self) -> u64 {
        self.len.max(self.base + self.filled as u64)
    }

    /// Appends `bytes` (to the buffer; full buffers reach the file).
    pub(super) fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let capacity = self.buf.capacity;
            let n = bytes.len().min(capacity - self.filled);
            let filled = self.filled;
            self.buf.bytes()[filled..filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled == capacity {
                self.write_out()?;
            }
        }
        Ok(())
    }

    /// Writes everything buffered to the file (not synced).
    pub(super) fn flush(&mut self) -> io::Result<()> {
        self.write_out()
    }

    /// Writes the buffer out; when direct, padded to a whole block, and the
    /// last block, if partly filled, kept to be written again.
    fn write_out(&mut self) -> io::Result<()> {
        let filled = self.filled;
        if filled == self.on_disk {
            return Ok(());
        }
        let base = self.base;
        if self.direct {
            let padded = filled.next_multiple_of(BLOCK);
            let bytes = self.buf.bytes();
            bytes[filled..padded].fill(0);
            self.file.write_all_at(&bytes[..padded], base)?;
            self.len = self.len.max(base + padded as u64);
            let kept = filled % BLOCK;
            let whole = filled - kept;
            bytes.copy_within(whole..filled, 0);
            self.base = base + whole as u64;
            self.filled = kept;
            self.on_disk = kept;
        } else {
            self.file.write_all_at(&self.buf.bytes()[..filled], base)?;
            self.len = self.len.max(base + filled as u64);
            self.base = base + filled as u64;
            self.filled = 0;
            self.on_disk = 0;
        }
        Ok(())
    }

    /// Writes what is buffered and syncs the data (and what is needed to
    /// read it back).
    pub(super) fn sync_data(&mut self) -> io::Result<()> {
        self.write_out()?;
        self.file.sync_data()
    }

    /// Writes what is buffered, cuts the file at `at` (the end of its
    /// records) and syncs it whole.
    pub(super) fn truncate(&mut self, at: u64) -> io::Result<()> {
        self.write_out()?;
        self.file.set_len(at)?;
        self.file.sync_all()?;
        self.len = at;
        Ok(())
    }
}

/// Opens `path` for reading and writing; past the page cache if asked and
/// the filesystem allows it. Answers whether it is.
fn open_file(path: &Path, direct: bool) -> io::Result<(File, bool)> {
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    #[cfg(target_os = "linux")]
    if direct {
        use std::os::unix::fs::OpenOptionsExt;
        let mut direct_options = options.clone();
        direct_options.custom_flags(libc::O_DIRECT);
        match direct_options.open(path) {
            Ok(file) => return Ok((file, true)),
            // The filesystem does not do direct I/O (tmpfs before 6.6,
            // some FUSE): buffered, as under the other policies.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(path = %path.display(), "stream log: the filesystem refuses O_DIRECT; writing through the page cache");
            }
            Err(e) => return Err(e),
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = direct;
    Ok((options.open(path)?, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends `pieces` through a head file reopened after each (so every
    /// piece starts inside a partly written block), flushing and syncing,
    /// and answers the file's records part.
    fn written(direct: bool, pieces: &[&[u8]], capacity: usize) -> (Vec<u8>, bool, u64) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("head.log");
        std::fs::write(&path, b"MAGIC123").expect("create");
        let mut at = 8u64;
        let mut was_direct = false;
        let mut len = 0;
        for piece in pieces {
            let mut head = HeadFile::open(&path, at, direct, capacity).expect("open");
            was_direct = head.is_direct();
            // Written in two calls, to cross the buffer's end mid-write.
            let (a, b) = piece.split_at(piece.len() / 3);
            head.write_all(a).expect("write");
            head.write_all(b).expect("write");
            head.sync_data().expect("sync");
            at += piece.len() as u64;
            len = head.len();
        }
        let bytes = std::fs::read(&path).expect("read");
        (bytes, was_direct, len)
    }

    fn pieces() -> Vec<Vec<u8>> {
        // Lengths around the block and the buffer: inside one block,
        // across one, exactly one, several buffers.
        [1usize, 4087, 4096, 5000, 3, 70_000, 8192, 12_345]
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 31 + j) as u8 | 1).collect())
            .collect()
    }

    fn check(direct: bool) {
        let pieces = pieces();
        let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
        let (bytes, was_direct, len) = written(direct, &refs, 16 << 10);
        let mut want = b"MAGIC123".to_vec();
        for p in &pieces {
            want.extend_from_slice(p);
        }
        assert_eq!(&bytes[..want.len()], &want[..], "the records, in order");
        assert_eq!(len, bytes.len() as u64, "the length it reports");
        // Not skipped quietly: the temporary directory must be on a disk
        // filesystem (set TMPDIR to one where /tmp is an old tmpfs).
        assert_eq!(
            was_direct,
            direct && cfg!(target_os = "linux"),
            "direct I/O as asked"
        );
        if was_direct {
            // Padded to the block, with zeros.
            assert_eq!(bytes.len() % BLOCK, 0);
            assert!(bytes[want.len()..].iter().all(|&b| b == 0));
        } else {
            assert_eq!(bytes.len(), want.len());
        }
    }

    #[test]
    fn direct_writes_land_in_order_however_they_straddle_blocks() {
        check(true);
    }

    #[test]
    fn buffered_writes_land_in_order() {
        check(false);
    }

    #[test]
    fn a_truncate_cuts_the_padding_and_writes_what_is_buffered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("head.log");
        std::fs::write(&path, b"MAGIC123").expect("create");
        let mut head = HeadFile::open(&path, 8, true, 8192).expect("open");
        head.write_all(&[7u8; 100]).expect("write");
        head.sync_data().expect("sync");
        head.write_all(&[9u8; 50]).expect("write");
        head.truncate(158).expect("truncate");
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(bytes.len(), 158);
        assert_eq!(&bytes[..8], b"MAGIC123");
        assert!(bytes[8..108].iter().all(|&b| b == 7));
        assert!(bytes[108..].iter().all(|&b| b == 9));
        assert_eq!(head.len(), 158);
    }
}
