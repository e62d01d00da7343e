//! One segment file of an embedded topic partition: entries appended back
//! to back, each framed and checksummed, as in a Kafka log segment.
//!
//! Entry: `len: u32` (of the body), `crc32: u32` (of the body), then the
//! body: `offset: i64`, `timestamp_ms: i64`, `key_len: i32` (-1 = no key),
//! key, value. All integers big endian. A segment is named after the offset
//! of its first entry; offsets inside it are contiguous.
//!
//! Which bytes are committed is not known here: the partition's end offset
//! is stored in the state store with the batch that wrote them, and readers
//! never read past it (see `embedded.rs`).

use super::{LogError, LogRecord};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const HEADER: usize = 8;
/// offset + timestamp + key length.
const BODY_FIXED: usize = 20;
/// What `entry_head` makes: the header and the body's fixed part.
pub const HEAD: usize = HEADER + BODY_FIXED;
/// Bytes read per `pread` when scanning.
const CHUNK: usize = 256 << 10;
/// A sparse index point is kept every this many entries.
const INDEX_EVERY: i64 = 64;
/// Direct writes start, end and come from memory at multiples of this.
const BLOCK: usize = 4096;
/// Bytes per direct write: a commit's bytes are written in pieces this size.
const DIRECT_BUF: usize = 1 << 20;

/// The framing of one entry: its header and the body's fixed part
/// (`HEADER + BODY_FIXED` bytes), the checksum over the whole body; the key
/// and the value follow it in the file.
pub fn entry_head(offset: i64, ts_ms: i64, key: Option<&[u8]>, value: &[u8]) -> [u8; HEAD] {
    entry_head_of(offset, ts_ms, key, std::iter::once(value))
}

/// `entry_head` of a value kept in pieces.
pub fn entry_head_of<'a>(
    offset: i64,
    ts_ms: i64,
    key: Option<&[u8]>,
    value: impl Iterator<Item = &'a [u8]> + Clone,
) -> [u8; HEAD] {
    let value_len = value.clone().map(<[u8]>::len).sum();
    let body_len = entry_len(key, value_len) - HEADER;
    let mut head = [0u8; HEAD];
    head[0..4].copy_from_slice(&(body_len as u32).to_be_bytes());
    head[8..16].copy_from_slice(&offset.to_be_bytes());
    head[16..24].copy_from_slice(&ts_ms.to_be_bytes());
    head[24..28].copy_from_slice(&key.map_or(-1, |k| k.len() as i32).to_be_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[HEADER..]);
    crc.update(key.unwrap_or_default());
    for part in value {
        crc.update(part);
    }
    head[4..8].copy_from_slice(&crc.finalize().to_be_bytes());
    head
}

/// Appends one framed entry to `buf`.
pub fn encode_entry(buf: &mut Vec<u8>, offset: i64, ts_ms: i64, key: Option<&[u8]>, value: &[u8]) {
    buf.reserve(entry_len(key, value.len()));
    buf.extend_from_slice(&entry_head(offset, ts_ms, key, value));
    buf.extend_from_slice(key.unwrap_or_default());
    buf.extend_from_slice(value);
}

/// The framed size of an entry (what `encode_entry` appends).
pub fn entry_len(key: Option<&[u8]>, value_len: usize) -> usize {
    HEADER + BODY_FIXED + key.map(|k| k.len()).unwrap_or(0) + value_len
}

/// The file name of the segment starting at `base`.
pub fn file_name(base: i64) -> String {
    format!("{base:020}.log")
}

/// The base offset of a segment file name, if it is one.
pub fn parse_file_name(name: &str) -> Option<i64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub struct Segment {
    /// Offset of the first entry.
    pub base: i64,
    path: PathBuf,
    file: File,
    /// Where reads may start without scanning from the segment's start.
    index: Mutex<Index>,
    /// How far `drop_behind` has gone.
    behind: Mutex<Behind>,
    /// Set while appends may bypass the page cache (`open_direct`, until
    /// `seal` or a refusal).
    direct: Mutex<Option<Direct>>,
}

/// The writer of a segment opened with `open_direct`: appends go to the
/// device with `O_DIRECT` from one reused buffer, so they take no page
/// cache. Direct writes must start and end on a block boundary, so the
/// segment's last partial block is kept here and written again, with what
/// follows it, by the next append; until then the file holds that block
/// padded with zeros (past the committed end, which readers never pass and
/// which a reopened log cuts the file back to).
struct Direct {
    /// Opened with `O_DIRECT`, without `O_APPEND` (writes say where).
    file: File,
    /// `DIRECT_BUF + BLOCK` bytes; the block-aligned window of `DIRECT_BUF`
    /// bytes starts at `pad`. A `Vec` that never grows, so never moves.
    buf: Vec<u8>,
    pad: usize,
    /// File position of the window's first byte (block aligned) and the
    /// bytes of the segment's last partial block held at its start; `None`
    /// until read from the file (at the first append, and after a
    /// truncation, a failed write or a buffered append).
    at: Option<(u64, usize)>,
}

impl Direct {
    /// Appends `parts` at the segment's end. On an error the file may hold
    /// part of them: the caller truncates it back.
    fn append(&mut self, read: &File, parts: &[IoSlice<'_>]) -> std::io::Result<()> {
        let (mut at, mut fill) = match self.at.take() {
            Some(at) => at,
            None => {
                let len = read.metadata()?.len();
                let at = len & !(BLOCK as u64 - 1);
                let tail = (len - at) as usize;
                let pad = self.pad;
                read.read_exact_at(&mut self.buf[pad..pad + tail], at)?;
                (at, tail)
            }
        };
        let buf = &mut self.buf[self.pad..self.pad + DIRECT_BUF];
        for part in parts {
            let mut bytes: &[u8] = part;
            while !bytes.is_empty() {
                let n = bytes.len().min(DIRECT_BUF - fill);
                buf[fill..fill + n].copy_from_slice(&bytes[..n]);
                fill += n;
                bytes = &bytes[n..];
                if fill == DIRECT_BUF {
                    self.file.write_all_at(buf, at)?;
                    at += DIRECT_BUF as u64;
                    fill = 0;
                }
            }
        }
        if fill > 0 {
            let end = fill.next_multiple_of(BLOCK);
            buf[fill..end].fill(0);
            self.file.write_all_at(&buf[..end], at)?;
            let keep = fill & !(BLOCK - 1);
            buf.copy_within(keep..fill, 0);
            at += keep as u64;
            fill -= keep;
        }
        self.at = Some((at, fill));
        Ok(())
    }
}

/// Drop-behind positions: the writeback of the bytes below `started` was
/// started; those below `dropped` were also dropped from the page cache.
#[derive(Default)]
struct Behind {
    started: u64,
    dropped: u64,
}

/// Positions of entries in a segment, learnt by reads as they pass.
#[derive(Default)]
struct Index {
    /// Sparse: every `INDEX_EVERY`-th offset -> byte position.
    points: BTreeMap<i64, u64>,
    /// Right after the last entry a read returned: a reader following the
    /// tail continues there.
    last: Option<(i64, u64)>,
}

impl Index {
    /// The closest known (offset, position) at or before `offset`.
    fn floor(&self, offset: i64, base: i64) -> (i64, u64) {
        let point = self
            .points
            .range(..=offset)
            .next_back()
            .map(|(o, p)| (*o, *p))
            .unwrap_or((base, 0));
        match self.last {
            Some(last) if last.0 <= offset && last.0 > point.0 => last,
            _ => point,
        }
    }
}

impl Segment {
    /// Opens (creating if missing) the segment starting at `base` in `dir`.
    pub fn open(dir: &Path, base: i64) -> Result<Segment, LogError> {
        let path = dir.join(file_name(base));
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| LogError::io("open", &path, e))?;
        Ok(Segment {
            base,
            path,
            file,
            index: Mutex::new(Index::default()),
            behind: Mutex::new(Behind::default()),
            direct: Mutex::new(None),
        })
    }

    /// `open`, with appends written past the page cache (`O_DIRECT`) for a
    /// topic nothing reads right behind its end. Where the file system
    /// refuses direct I/O the segment is written like any other.
    pub fn open_direct(dir: &Path, base: i64) -> Result<Segment, LogError> {
        use std::os::unix::fs::OpenOptionsExt;
        let seg = Segment::open(dir, base)?;
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&seg.path)
        {
            Ok(file) => {
                let buf = vec![0u8; DIRECT_BUF + BLOCK];
                let pad = buf.as_ptr().align_offset(BLOCK);
                *seg.direct.lock().expect("direct lock") = Some(Direct {
                    file,
                    buf,
                    pad,
                    at: None,
                });
            }
            Err(e) => refused_direct(&seg.path, &e),
        }
        Ok(seg)
    }

    /// Whether appends bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.lock().expect("direct lock").is_some()
    }

    /// Ends direct writes (the segment is full: a new one takes the
    /// appends): cuts the padding off and frees the writer's buffer.
    pub fn seal(&self) -> Result<(), LogError> {
        if let Some(d) = self.direct.lock().expect("direct lock").take() {
            if let Some((at, fill)) = d.at {
                self.file
                    .set_len(at + fill as u64)
                    .map_err(|e| LogError::io("truncate", &self.path, e))?;
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the file (committed or not).
    pub fn file_len(&self) -> Result<u64, LogError> {
        Ok(self
            .file
            .metadata()
            .map_err(|e| LogError::io("stat", &self.path, e))?
            .len())
    }

    /// Appends already framed entries.
    pub fn append(&self, bytes: &[u8]) -> Result<(), LogError> {
        self.append_parts(&mut [IoSlice::new(bytes)], false)
    }

    /// Appends the parts of framed entries back to back (each entry's
    /// `entry_head`, key and value): with `direct` past the page cache if
    /// the segment was opened with `open_direct`, else with `writev` (the
    /// kernel copies them into the file from where they are, with no
    /// buffer in between).
    pub fn append_parts(&self, parts: &mut [IoSlice<'_>], direct: bool) -> Result<(), LogError> {
        let mut guard = self.direct.lock().expect("direct lock");
        if let Some(d) = guard.as_mut() {
            let end = d.at.map(|(at, fill)| at + fill as u64);
            if direct {
                let before = match end {
                    Some(end) => end,
                    None => self.file_len()?,
                };
                match d.append(&self.file, parts) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        // An alignment the device does not take: this
                        // segment is written through the page cache from
                        // here on, from its end before this append.
                        refused_direct(&self.path, &e);
                        *guard = None;
                        self.file
                            .set_len(before)
                            .map_err(|e| LogError::io("truncate", &self.path, e))?;
                    }
                    Err(e) => return Err(LogError::io("write", &self.path, e)),
                }
            } else if let Some(end) = end {
                // After direct writes the file ends in a padded block: cut
                // it to the entries' end, where the buffered append goes.
                d.at = None;
                self.file
                    .set_len(end)
                    .map_err(|e| LogError::io("truncate", &self.path, e))?;
            }
        }
        drop(guard);
        let mut parts = parts;
        // Leading empty parts go first: a write of nothing but empty parts
        // would return 0.
        IoSlice::advance_slices(&mut parts, 0);
        while !parts.is_empty() {
            match (&self.file).write_vectored(parts) {
                Ok(0) => {
                    return Err(LogError::io(
                        "write",
                        &self.path,
                        std::io::ErrorKind::WriteZero.into(),
                    ))
                }
                Ok(n) => IoSlice::advance_slices(&mut parts, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LogError::io("write", &self.path, e)),
            }
        }
        Ok(())
    }

    /// Lets the OS drop this segment's bytes below `upto` from its page
    /// cache, in two passes one call apart: the first starts their
    /// writeback, the next drops them (`POSIX_FADV_DONTNEED` starts the
    /// writeback of dirty pages and drops only clean ones). Ranges shorter
    /// than `step` wait for more. True while a range is between the passes.
    /// Only whole pages are dropped, and the last one if `upto` is the end.
    ///
    /// Written log pages nobody reads again (the stages read right behind
    /// the end) would otherwise stay cached until the OS needs the memory,
    /// and every append would take a fresh page. Advice only: a page still
    /// dirty stays cached, and a failed advice costs nothing but memory.
    pub fn drop_behind(&self, upto: u64, step: u64) -> bool {
        let mut b = self.behind.lock().expect("behind lock");
        if b.started > b.dropped {
            advise_dont_need(&self.file, b.dropped, b.started);
            b.dropped = b.started;
        }
        if upto > b.started && upto - b.started >= step {
            advise_dont_need(&self.file, b.started, upto);
            b.started = upto;
        }
        b.started > b.dropped
    }

    /// Whether the file's bytes past `len` (its committed end) are only the
    /// zeros that pad a direct write's last block: what a log written
    /// with direct I/O holds after it stopped, not an uncommitted batch.
    pub fn is_padding_past(&self, len: u64) -> Result<bool, LogError> {
        let file_len = self.file_len()?;
        let Some(extra) = file_len.checked_sub(len) else {
            return Ok(false);
        };
        if extra == 0 || extra >= BLOCK as u64 || file_len % BLOCK as u64 != 0 {
            return Ok(false);
        }
        let mut tail = vec![0u8; extra as usize];
        self.file
            .read_exact_at(&mut tail, len)
            .map_err(|e| LogError::io("read", &self.path, e))?;
        Ok(tail.iter().all(|b| *b == 0))
    }

    /// Cuts the file to `len` bytes (drops what an uncommitted batch wrote).
    pub fn truncate(&self, len: u64) -> Result<(), LogError> {
        if let Some(d) = self.direct.lock().expect("direct lock").as_mut() {
            d.at = None;
        }
        self.file
            .set_len(len)
            .map_err(|e| LogError::io("truncate", &self.path, e))?;
        let mut index = self.index.lock().expect("index lock");
        index.points.retain(|_, pos| *pos < len);
        if index.last.is_some_and(|(_, pos)| pos > len) {
            index.last = None;
        }
        Ok(())
    }

    pub fn sync(&self) -> Result<(), LogError> {
        self.file
            .sync_data()
            .map_err(|e| LogError::io("fsync", &self.path, e))
    }

    /// Reads entries `from..=last` (all committed), at most `max`, into `out`.
    pub fn read(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        last: i64,
        max: usize,
        out: &mut Vec<LogRecord>,
    ) -> Result<(), LogError> {
        let (mut offset, mut pos) = self
            .index
            .lock()
            .expect("index lock")
            .floor(from, self.base);
        let mut reader = ChunkReader::new(&self.file, pos);
        let mut points = Vec::new();
        let wanted = out.len() + max;
        while offset <= last && out.len() < wanted {
            let header = reader.take(HEADER).map_err(|e| self.io(e))?;
            let len = u32::from_be_bytes(header[..4].try_into().expect("4")) as usize;
            let crc = u32::from_be_bytes(header[4..8].try_into().expect("4"));
            if len < BODY_FIXED {
                return Err(self.corrupt(pos, "entry shorter than its header"));
            }
            // Only a length beyond one chunk could make `take` allocate much
            // (shorter ones past the end fail there): stat only for those.
            if len > CHUNK && pos + (HEADER + len) as u64 > self.file_len()? {
                return Err(self.corrupt(pos, "entry longer than the file"));
            }
            let body = reader.take(len).map_err(|e| self.io(e))?;
            if crc32fast::hash(body) != crc {
                return Err(self.corrupt(pos, "checksum mismatch"));
            }
            let at = i64::from_be_bytes(body[..8].try_into().expect("8"));
            if at != offset {
                return Err(self.corrupt(pos, "offsets out of sequence"));
            }
            if (offset - self.base) % INDEX_EVERY == 0 {
                points.push((offset, pos));
            }
            if offset >= from {
                let ts = i64::from_be_bytes(body[8..16].try_into().expect("8"));
                let klen = i32::from_be_bytes(body[16..20].try_into().expect("4"));
                let (key, value) = if klen < 0 {
                    (None, &body[BODY_FIXED..])
                } else {
                    let end = BODY_FIXED + klen as usize;
                    if end > body.len() {
                        return Err(self.corrupt(pos, "key longer than the entry"));
                    }
                    (Some(body[BODY_FIXED..end].to_vec()), &body[end..])
                };
                out.push(LogRecord {
                    topic: topic.to_string(),
                    partition,
                    offset,
                    timestamp_ms: ts,
                    key,
                    value: bytes::Bytes::copy_from_slice(value),
                });
            }
            pos += (HEADER + len) as u64;
            offset += 1;
        }
        let mut index = self.index.lock().expect("index lock");
        index.points.extend(points);
        if index.last.is_none_or(|(o, _)| o < offset) {
            index.last = Some((offset, pos));
        }
        Ok(())
    }

    fn io(&self, e: std::io::Error) -> LogError {
        LogError::io("read", &self.path, e)
    }

    fn corrupt(&self, pos: u64, what: &str) -> LogError {
        LogError::Corrupt(format!(
            "{} at byte {pos}: {what}; the data dir is damaged (restore it, or delete the topic's files and rebuild)",
            self.path.display()
        ))
    }
}

impl Drop for ChunkReader<'_> {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.capacity() <= 4 * CHUNK {
            READ_BUFFER.with(|b| b.set(buf));
        }
    }
}

/// Sequential reads of a file in large `pread`s.
struct ChunkReader<'a> {
    file: &'a File,
    buf: Vec<u8>,
    /// File position of `buf[0]`.
    at: u64,
    cursor: usize,
}

thread_local! {
    /// A reader's buffer, kept for the next read on the same thread (fresh
    /// large allocations cost page faults on every batch).
    static READ_BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

impl<'a> ChunkReader<'a> {
    fn new(file: &'a File, at: u64) -> ChunkReader<'a> {
        let mut buf = READ_BUFFER.with(|b| b.take());
        buf.clear();
        ChunkReader {
            file,
            buf,
            at,
            cursor: 0,
        }
    }

    /// The next `n` bytes; an error if the file ends before them.
    fn take(&mut self, n: usize) -> std::io::Result<&[u8]> {
        if self.cursor + n > self.buf.len() {
            self.at += self.cursor as u64;
            self.buf.drain(..self.cursor);
            self.cursor = 0;
            let have = self.buf.len();
            let want = (n - have.min(n)).max(CHUNK);
            self.buf.resize(have + want, 0);
            let mut filled = have;
            while filled < have + want {
                match self
                    .file
                    .read_at(&mut self.buf[filled..], self.at + filled as u64)
                {
                    Ok(0) => break,
                    Ok(k) => filled += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            self.buf.truncate(filled);
            if filled < n {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the segment ends inside a committed entry",
                ));
            }
        }
        let s = &self.buf[self.cursor..self.cursor + n];
        self.cursor += n;
        Ok(s)
    }
}

fn refused_direct(path: &Path, e: &std::io::Error) {
    tracing::warn!(path = %path.display(), error = %e, "the file system refuses direct I/O; writing through the page cache");
}

/// `POSIX_FADV_DONTNEED` for the bytes `from..to` of `file` (errors ignored: advice).
fn advise_dont_need(file: &File, from: u64, to: u64) {
    use std::os::fd::AsRawFd;
    if to <= from {
        return;
    }
    // SAFETY: a plain syscall on an open descriptor; no memory is passed.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            from as libc::off_t,
            (to - from) as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

/// Pages of `path`'s bytes `from..to` in the page cache (tests of drop-behind).
#[cfg(test)]
pub(crate) fn resident_pages(path: &Path, from: u64, to: u64) -> usize {
    use std::os::fd::AsRawFd;
    let file = File::open(path).unwrap();
    let (from, len) = (from & !4095, (to - (from & !4095)) as usize);
    let pages = len.div_ceil(4096);
    let mut vec = vec![0u8; pages];
    // SAFETY: a read-only shared mapping of an open file, only given to
    // mincore (never read through) and unmapped before returning.
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            from as libc::off_t,
        );
        assert_ne!(at, libc::MAP_FAILED);
        assert_eq!(libc::mincore(at, len, vec.as_mut_ptr()), 0);
        libc::munmap(at, len);
    }
    vec.iter().filter(|b| *b & 1 == 1).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_in_pieces_is_framed_as_the_whole() {
        let value: Vec<u8> = (0..700u32).map(|i| (i * 31 % 251) as u8).collect();
        for key in [None, Some(&b""[..]), Some(&b"user-1"[..])] {
            let whole = entry_head(42, 7, key, &value);
            for cuts in [vec![], vec![0], vec![1, 1], vec![256, 300, 699], vec![700]] {
                let mut pieces = Vec::new();
                let mut at = 0;
                for c in cuts {
                    pieces.push(&value[at..c]);
                    at = c;
                }
                pieces.push(&value[at..]);
                let head = entry_head_of(42, 7, key, pieces.into_iter());
                assert_eq!(head, whole);
            }
        }
    }

    /// Drop-behind drops written pages in its second pass once they are
    /// clean, leaves the newer ones cached, and loses no data. In a dir of
    /// the checkout: a tmpfs `/tmp` has no page cache to drop.
    #[test]
    fn drop_behind_drops_written_pages_in_two_passes_and_loses_nothing() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let seg = Segment::open(dir.path(), 0).unwrap();
        let mut buf = Vec::new();
        for i in 0..96i64 {
            encode_entry(&mut buf, i, i, None, &vec![i as u8; 128 << 10]);
        }
        seg.append(&buf).unwrap();
        let len = seg.file_len().unwrap();
        let mib = 1u64 << 20;
        assert_eq!(
            resident_pages(seg.path(), 0, len) as u64,
            len.div_ceil(4096)
        );
        assert!(!seg.drop_behind(2 * mib, 4 * mib), "shorter than a step");
        // First pass: the writeback of the first 8 MiB starts (dirty pages
        // stay cached); the sync stands in for the time until the next pass.
        assert!(seg.drop_behind(8 * mib, 4 * mib));
        seg.sync().unwrap();
        // Second pass: that range is dropped; 1 MiB more is under a step.
        assert!(!seg.drop_behind(9 * mib, 4 * mib));
        assert_eq!(resident_pages(seg.path(), 0, 8 * mib), 0);
        assert_eq!(
            resident_pages(seg.path(), 8 * mib, len) as u64,
            (len - 8 * mib).div_ceil(4096),
            "the bytes not yet behind stay cached"
        );
        let mut out = Vec::new();
        seg.read("t", 0, 0, 95, 1000, &mut out).unwrap();
        assert_eq!(out.len(), 96);
        assert!(out
            .iter()
            .all(|r| r.value == vec![r.offset as u8; 128 << 10]));
    }

    /// A segment written past the page cache holds, up to its logical end,
    /// exactly the framed bytes of what was appended: across partial
    /// blocks written again, windows of `DIRECT_BUF`, a truncation (a
    /// failed commit's undo), a reopen and buffered appends in between;
    /// none of the direct bytes is left in the page cache. In a dir of the
    /// checkout (a tmpfs `/tmp` may refuse direct I/O); the test fails if
    /// this file system refuses it.
    #[test]
    fn direct_appends_hold_the_framed_bytes_and_skip_the_page_cache() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let seg = Segment::open_direct(dir.path(), 0).unwrap();
        assert!(seg.is_direct(), "this file system refuses O_DIRECT");
        let mut want = Vec::new();
        let mut offset = 0i64;
        fn append(
            seg: &Segment,
            want: &mut Vec<u8>,
            offset: &mut i64,
            direct: bool,
            sizes: &[usize],
        ) {
            let values: Vec<Vec<u8>> = sizes
                .iter()
                .map(|n| (0..*n).map(|i| (i as i64 * 7 + *offset) as u8).collect())
                .collect();
            let heads: Vec<[u8; HEAD]> = values
                .iter()
                .enumerate()
                .map(|(i, v)| entry_head(*offset + i as i64, 5, Some(b"k"), v))
                .collect();
            let mut parts = Vec::new();
            for (h, v) in heads.iter().zip(&values) {
                encode_entry(want, *offset, 5, Some(b"k"), v);
                *offset += 1;
                parts.push(IoSlice::new(h));
                parts.push(IoSlice::new(b"k"));
                parts.push(IoSlice::new(v));
            }
            seg.append_parts(&mut parts, direct).unwrap();
        }
        let prefix = |seg: &Segment, n: usize| {
            let bytes = std::fs::read(seg.path()).unwrap();
            assert!(bytes.len() >= n && bytes.len().is_multiple_of(BLOCK));
            assert!(bytes[n..].iter().all(|b| *b == 0), "zeros past the end");
            bytes[..n].to_vec()
        };
        append(&seg, &mut want, &mut offset, true, &[10, 3000, 1]);
        append(&seg, &mut want, &mut offset, true, &[5000]);
        append(
            &seg,
            &mut want,
            &mut offset,
            true,
            &[DIRECT_BUF + 123, 700, DIRECT_BUF * 2],
        );
        append(&seg, &mut want, &mut offset, true, &[0, 4096 - HEAD - 1]);
        let len = want.len() as u64;
        assert_eq!(resident_pages(seg.path(), 0, len), 0);
        assert_eq!(prefix(&seg, want.len()), want);
        // A commit that failed is cut off; the next append continues there.
        let kept = want.len();
        append(&seg, &mut want, &mut offset, true, &[9000]);
        seg.truncate(kept as u64).unwrap();
        want.truncate(kept);
        offset -= 1;
        append(&seg, &mut want, &mut offset, true, &[100, 200]);
        assert_eq!(prefix(&seg, want.len()), want);
        // Reopened, cut back to the committed end (as `recover` does).
        drop(seg);
        let seg = Segment::open_direct(dir.path(), 0).unwrap();
        seg.truncate(want.len() as u64).unwrap();
        append(&seg, &mut want, &mut offset, true, &[300]);
        assert_eq!(prefix(&seg, want.len()), want);
        let mut out = Vec::new();
        seg.read("t", 0, 0, offset - 1, 1000, &mut out).unwrap();
        assert_eq!(out.len(), offset as usize);
        assert_eq!(out[4].value.len(), DIRECT_BUF + 123);
        // Buffered appends between direct ones (a stage that caught up).
        append(&seg, &mut want, &mut offset, false, &[50, 6000]);
        assert_eq!(std::fs::read(seg.path()).unwrap(), want, "no padding left");
        append(&seg, &mut want, &mut offset, true, &[70]);
        append(&seg, &mut want, &mut offset, false, &[80]);
        append(&seg, &mut want, &mut offset, true, &[90, 5000]);
        assert_eq!(prefix(&seg, want.len()), want);
    }

    /// Entries appended as parts (more than one `writev` takes: IOV_MAX is
    /// 1,024) are the bytes `encode_entry` frames, and read back.
    #[test]
    fn entries_appended_as_parts_are_the_framed_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let entries: Vec<(i64, Option<Vec<u8>>, Vec<u8>)> = (0..700i64)
            .map(|i| {
                let key = (i % 5 != 0).then(|| format!("user-{i}").into_bytes());
                (i, key, vec![i as u8; (i as usize * 37) % 900])
            })
            .collect();
        let framed = Segment::open(dir.path(), 0).unwrap();
        let mut buf = Vec::new();
        for (i, k, v) in &entries {
            encode_entry(&mut buf, *i, i * 3, k.as_deref(), v);
        }
        framed.append(&buf).unwrap();
        let sub = dir.path().join("parts");
        std::fs::create_dir(&sub).unwrap();
        let seg = Segment::open(&sub, 0).unwrap();
        let heads: Vec<[u8; HEAD]> = entries
            .iter()
            .map(|(i, k, v)| entry_head(*i, i * 3, k.as_deref(), v))
            .collect();
        let mut parts = Vec::new();
        for ((_, k, v), h) in entries.iter().zip(&heads) {
            parts.push(IoSlice::new(h));
            if let Some(k) = k {
                parts.push(IoSlice::new(k));
            }
            parts.push(IoSlice::new(v));
        }
        assert!(parts.len() > 1024);
        seg.append_parts(&mut parts, false).unwrap();
        assert_eq!(std::fs::read(seg.path()).unwrap(), buf);
        let mut out = Vec::new();
        seg.read("t", 0, 0, 699, 1000, &mut out).unwrap();
        assert_eq!(out.len(), 700);
        assert!(out
            .iter()
            .zip(&entries)
            .all(|(r, (i, k, v))| r.offset == *i && r.key == *k && r.value == *v));
    }

    #[test]
    fn entries_round_trip_and_corruption_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let seg = Segment::open(dir.path(), 10).unwrap();
        let mut buf = Vec::new();
        let mut pos = 0;
        for i in 0..200i64 {
            if i == 140 {
                pos = buf.len() as u64;
            }
            let key = (i % 3 != 0).then(|| format!("k{i}").into_bytes());
            encode_entry(
                &mut buf,
                10 + i,
                i * 7,
                key.as_deref(),
                &vec![i as u8; i as usize * 50],
            );
        }
        seg.append(&buf).unwrap();
        let mut out = Vec::new();
        seg.read("t", 2, 10, 209, 1000, &mut out).unwrap();
        assert_eq!(out.len(), 200);
        assert_eq!(out[5].offset, 15);
        assert_eq!(out[5].key.as_deref(), Some(&b"k5"[..]));
        assert_eq!(out[6].key, None);
        assert_eq!(out[199].value.len(), 199 * 50);
        assert_eq!(out[7].timestamp_ms, 49);
        // From the middle (through the index the first read left), bounded.
        let mut out = Vec::new();
        seg.read("t", 2, 150, 209, 3, &mut out).unwrap();
        assert_eq!(
            out.iter().map(|r| r.offset).collect::<Vec<_>>(),
            vec![150, 151, 152]
        );
        // Truncated to 140 entries (offsets 10..150): reading past them fails, before them works.
        seg.truncate(pos).unwrap();
        let mut out = Vec::new();
        assert!(seg.read("t", 2, 140, 150, 100, &mut out).is_err());
        let mut out = Vec::new();
        seg.read("t", 2, 140, 149, 100, &mut out).unwrap();
        assert_eq!(out.len(), 10);
        // A flipped byte is reported, not returned.
        let f = OpenOptions::new().write(true).open(seg.path()).unwrap();
        f.write_at(&[0xAB], 100).unwrap();
        let fresh = Segment::open(dir.path(), 10).unwrap();
        let mut out = Vec::new();
        let err = fresh.read("t", 2, 10, 149, 100, &mut out).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        // A damaged length is reported, not allocated.
        let bad = Segment::open(dir.path(), 500).unwrap();
        bad.append(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 1, 2, 3])
            .unwrap();
        let err = bad.read("t", 2, 500, 500, 1, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("longer than the file"), "{err}");
    }

    #[test]
    fn file_names_sort_by_offset() {
        assert_eq!(file_name(42), "00000000000000000042.log");
        assert_eq!(parse_file_name(&file_name(42)), Some(42));
        assert_eq!(parse_file_name("42.log"), None);
        assert_eq!(parse_file_name("00000000000000000042.tmp"), None);
    }
}
