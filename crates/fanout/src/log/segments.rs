//! The on-disk layer of the write log: an append-only log of opaque byte records, split into segment files, with
//! group commit. It knows nothing of what the records mean.
//!
//! # Format
//! `DIR` holds segment files named by a monotonically increasing id, `{id:016x}.seg`, the first being 1. The
//! newest one is the *active* segment, the only one written to; the others are *sealed* and never change again
//! (until [`Segments::remove_before`] deletes them). A segment is an 8-byte header, the magic `FNOUTLG1`, then
//! frames:
//!
//! ```text
//! [len: u32 LE][crc: u32 LE][payload: len bytes]
//! ```
//!
//! `len` is at most [`MAX_RECORD`]. `crc` is the CRC-32 (IEEE) of the four `len` bytes followed by the payload:
//! covering the length too means that a run of zeros (what a file extended by a crash but never written holds)
//! is not a valid empty record, and that a damaged length is caught by the checksum, not only by bounds. A
//! record's [`Position`] is its segment id and the offset of its frame in that file. A new segment is started
//! when a frame would take the active one past [`SegmentsConfig::segment_bytes`]; a record larger than that still
//! goes, alone, into a segment of its own.
//!
//! # Permissions
//! The records hold what clients sent (passwords among it), so the store is its owner's alone: the directory is
//! created `0700` (with any missing parents) and every file `0600` (segments, torn tails kept aside), the bits
//! set explicitly after creation, so whatever the umask. [`Segments::open`] also tightens the directory and the
//! files already in it (an earlier version made them `0755` and `0644`), with one warning saying how many.
//!
//! # Group commit
//! Appends are queued (in the order of the calls: the queue is filled when [`Segments::append`] is called, not
//! when its future is first polled) for one writer thread, `log-writer`, which owns the active file. It waits for
//! the first request, takes every other one already waiting (up to [`BATCH_REQUESTS`] requests or
//! [`BATCH_BYTES`] bytes), writes all their frames with one positional write per segment touched, calls
//! `fdatasync` once if any of them asked for [`SyncMode::Now`] (or is a [`Segments::flush`]), and only then
//! answers them all. Many concurrent durable appends therefore share one fsync. The file order is the queue
//! order.
//!
//! Before a segment is sealed it is fsynced, and once its successor is created (its header written and synced)
//! the directory is fsynced, so that the new file survives a crash and a sealed segment can never end in a torn
//! frame.
//!
//! # Durability and crashes
//! - [`SyncMode::Now`]: the future resolves `Ok` only once the record is on disk (`fdatasync` returned).
//! - [`SyncMode::Lazy`]: the record is written (to the page cache) with the next batch and is readable at once;
//!   it becomes durable with the next `Now` append or [`Segments::flush`] that follows it (or when its segment is
//!   sealed, or at [`Segments::close`]). After a crash, the lazy records written since the last sync may be
//!   missing; since every sync covers everything written before it, what is lost is always a suffix of the log.
//!
//! A crash in the middle of a write leaves a *torn tail*: an incomplete or damaged frame at the end of the active
//! segment. [`Segments::open`] checks every frame of every segment, cuts such a tail off the last segment (with a
//! warning naming the file and offset) and goes on from there. A bad frame in a sealed segment is not a crash's
//! doing (sealed segments were fsynced whole): it is [`SegmentError::Corrupt`], and the caller should refuse to
//! start rather than silently lose records from the middle of the log.
//!
//! # Failures
//! After a failed write or fsync, the batch's requests are answered with the error (an error means "may or may
//! not be in the log", as after a timeout; never `Ok` for a `Now` record that may not be on disk),
//! [`Segments::healthy`] turns false, and the next batch first repairs the active segment: it is cut back to the
//! last length that was both synced and handed out, and, if that drops lazy records whose positions were already
//! handed out, a fresh segment is started so that no position is ever reused. An I/O failure thus loses at most
//! the unsynced lazy records, like a crash. If the repair fails, the batch fails and the next one tries again
//! (a segment whose tail could not be cut is never sealed: [`Segments::open`] would refuse it).
//!
//! # Back-pressure
//! A caller awaiting its appends is held back by its own futures (they resolve only once everything queued
//! before them is written). [`Segments::append_lazy`], which has no future, is refused with
//! [`SegmentError::Backlog`] while more than [`MAX_LAZY_BACKLOG`] bytes wait for the writer, so that a producer
//! of lazy records alone cannot fill the memory; it never blocks the calling thread.
//!
//! # Reading
//! [`Segments::read`] reads one record by position (a `pread` on a cached read-only handle, safe from any thread
//! while the writer appends). Startup replay does not return every record at once (a backlog of gigabytes would
//! have to fit in memory): [`Segments::open`] checks everything with constant memory and returns the handle, and
//! [`Segments::replay`] then streams the records, oldest first, one at a time. This reads the log twice at
//! startup (the second time mostly from the page cache), in exchange for a log that is known good before the
//! first record is handed out.
//!
//! # Dependency
//! The checksum is `crc32fast`: a few hundred lines of SIMD (PCLMULQDQ / ARMv8 CRC) with a portable fallback,
//! widely used and well tested; several times faster than a table-driven CRC, and not something to write and
//! maintain ourselves.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::lock;

use tokio::sync::oneshot;

/// The first 8 bytes of every segment file.
pub const MAGIC: [u8; 8] = *b"FNOUTLG1";
/// The size of a segment's header (the magic), in bytes: the offset of its first frame.
pub const HEADER_BYTES: u64 = MAGIC.len() as u64;
/// The size of a frame's header (length and checksum), in bytes.
pub const FRAME_HEADER_BYTES: u64 = 8;
/// The largest record, in bytes (16 MiB); a larger append is refused with [`SegmentError::TooLarge`].
pub const MAX_RECORD: usize = 16 * 1024 * 1024;
/// Requests the writer takes into one batch at most.
pub const BATCH_REQUESTS: usize = 4096;
/// Frame bytes the writer takes into one batch at most (a larger single request still goes, alone).
pub const BATCH_BYTES: u64 = 8 * 1024 * 1024;
/// The longest tail of the last segment that [`Segments::open`] cuts as torn by a crash (a batch, or a record
/// of the largest size, plus the lazy records a slow second may leave unsynced); a longer damaged tail is
/// [`SegmentError::Corrupt`].
pub const MAX_TORN_TAIL: u64 = BATCH_BYTES + MAX_RECORD as u64 + 16 * 1024 * 1024;
/// Frame bytes waiting past which a lazy append wakes the writer (below, lazy records wait for the next awaited
/// append or flush).
pub const LAZY_WAKE_BYTES: u64 = 1024 * 1024;
/// Frame bytes waiting for the writer beyond which [`Segments::append_lazy`] is refused (64 MiB).
pub const MAX_LAZY_BACKLOG: u64 = 64 * 1024 * 1024;
/// The read buffer of startup checks and replay.
const READ_BUFFER: usize = 256 * 1024;
/// Permission bits of the store's directories: the owner's alone.
pub const DIR_MODE: u32 = 0o700;
/// Permission bits of the store's files: read and write for the owner alone.
pub const FILE_MODE: u32 = 0o600;

/// Where and how large the segments are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentsConfig {
    /// The directory of the segment files, created (with its parents) if missing. It belongs to one open
    /// [`Segments`] at a time: two writers on one directory would interleave garbage.
    pub dir: PathBuf,
    /// The size, in bytes, past which the active segment is sealed and a new one started (header included). A
    /// record whose frame is larger goes alone into a segment of its own.
    pub segment_bytes: u64,
}

/// Where a record is: its segment's id and the byte offset of its frame in that file. Positions sort in log
/// order, and are never reused for another record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// The segment's id (its file is `{segment:016x}.seg`).
    pub segment: u64,
    /// The offset of the record's frame in the file, in bytes (at least [`HEADER_BYTES`]).
    pub offset: u64,
}

/// When an append is made durable. (Not called `Sync`: that would shadow `std::marker::Sync` wherever it is
/// imported.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// The append resolves only once its record is on disk (`fdatasync`), sharing the fsync with the rest of its
    /// batch.
    Now,
    /// The record is written with the next batch without forcing an fsync; it is made durable by the next `Now`
    /// append or flush queued after it. A crash may lose it (see the module doc).
    Lazy,
}

/// One segment as [`Segments::segments`] lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    /// The segment's id.
    pub id: u64,
    /// Its size on disk, in bytes, header included (the active one's: as far as written successfully).
    pub bytes: u64,
    /// False for the active segment (the newest), true for the others.
    pub sealed: bool,
}

/// A failure of the segment log.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The segment file, or the directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A segment holds something that is not a valid frame where one should be.
    #[error("{}: corrupt at byte {offset}: {why}", path.display())]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Where the bad header or frame starts, in bytes from the start of the file.
        offset: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// The record (of this many bytes) is larger than [`MAX_RECORD`]; nothing was queued.
    #[error("a record of {0} bytes is over the maximum of {MAX_RECORD}")]
    TooLarge(usize),
    /// There is no record at this position: its segment was removed (or never existed), or it lies past what was
    /// written (for example a lazy record dropped by the repair after an I/O failure).
    #[error("no record at segment {} offset {}", .0.segment, .0.offset)]
    NotFound(Position),
    /// [`Segments::append_lazy`] refused: more than [`MAX_LAZY_BACKLOG`] bytes wait for the writer. Nothing was
    /// queued.
    #[error("the write log's queue is full: lazy append refused")]
    Backlog,
    /// The log was closed (or its writer thread is gone); nothing was queued.
    #[error("the write log is closed")]
    Closed,
}

impl SegmentError {
    fn io(path: &Path, source: io::Error) -> Self {
        SegmentError::Io { path: path.to_owned(), source }
    }

    /// The same error again, to answer every request of a failed batch (`io::Error` is not `Clone`).
    fn duplicate(&self) -> Self {
        match self {
            SegmentError::Io { path, source } => {
                SegmentError::Io { path: path.clone(), source: io::Error::new(source.kind(), source.to_string()) }
            }
            SegmentError::Corrupt { path, offset, why } => {
                SegmentError::Corrupt { path: path.clone(), offset: *offset, why }
            }
            SegmentError::TooLarge(n) => SegmentError::TooLarge(*n),
            SegmentError::NotFound(at) => SegmentError::NotFound(*at),
            SegmentError::Backlog => SegmentError::Backlog,
            SegmentError::Closed => SegmentError::Closed,
        }
    }
}

type Reply = oneshot::Sender<Result<Vec<Position>, SegmentError>>;

/// One call's worth of records (none for a flush), appended contiguously.
struct Request {
    records: Vec<Vec<u8>>,
    sync: SyncMode,
    /// `None` for a fire-and-forget lazy append.
    reply: Option<Reply>,
    /// Frame bytes, for the batch and backlog bounds.
    bytes: u64,
}

struct Queue {
    requests: VecDeque<Request>,
    /// Frame bytes of `requests`.
    bytes: u64,
    /// No request is taken any more; the writer stops once `requests` is empty.
    closed: bool,
    /// Requests in `requests` that someone awaits (appends with a future, flushes).
    awaited: usize,
}

#[derive(Clone, Copy)]
struct SegState {
    bytes: u64,
    sealed: bool,
}

/// What the handles and the writer thread share.
struct Shared {
    dir: PathBuf,
    queue: Mutex<Queue>,
    /// Signalled when a request is queued or the queue is closed.
    ready: Condvar,
    /// Every segment on disk, by id. Lock order: `segments` before `readers`.
    segments: Mutex<BTreeMap<u64, SegState>>,
    readers: Mutex<HashMap<u64, Arc<File>>>,
    healthy: AtomicBool,
    /// Failures to inject into the writer's writes and fsyncs, for the tests of the repair.
    #[cfg(test)]
    faults: tests::Faults,
}

impl Shared {
    fn close_queue(&self) {
        lock(&self.queue).closed = true;
        self.ready.notify_all();
    }

    /// Waits for a request and takes it with every other one waiting, up to the batch bounds; `None` once the
    /// queue is closed and empty.
    fn next_batch(&self) -> Option<Vec<Request>> {
        let mut queue = lock(&self.queue);
        // Lazy records alone wait (see `Segments::append_lazy`), unless they pile up or the log closes.
        while queue.awaited == 0 && queue.bytes < LAZY_WAKE_BYTES && !queue.closed {
            queue = self.ready.wait(queue).unwrap_or_else(PoisonError::into_inner);
        }
        if queue.requests.is_empty() {
            return None;
        }
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(front) = queue.requests.front() {
            if !batch.is_empty() && (batch.len() >= BATCH_REQUESTS || bytes + front.bytes > BATCH_BYTES) {
                break;
            }
            let Some(request) = queue.requests.pop_front() else { break };
            bytes += request.bytes;
            if request.reply.is_some() {
                queue.awaited -= 1;
            }
            batch.push(request);
        }
        queue.bytes -= bytes;
        Some(batch)
    }
}

/// The handles' common part: the last one dropped closes the queue (the writer then finishes what is queued).
struct Handle {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.close_queue();
    }
}

/// An open segment log. Cheap to clone (every clone is the same log); the writer thread stops when
/// [`Segments::close`] is called on any clone, or when the last clone is dropped (after writing and syncing what
/// is queued, without waiting for it then).
#[derive(Clone)]
pub struct Segments {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Segments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segments").field("dir", &self.handle.shared.dir).finish_non_exhaustive()
    }
}

impl Segments {
    /// Opens `config.dir` (creating it if missing, with segment 1 in it), checks every frame of every segment,
    /// cuts a torn tail off the last segment (logging a warning with the file and offset), fsyncs it, and starts
    /// the writer thread. Read the records with [`Segments::replay`].
    ///
    /// Blocking file I/O that reads the whole log: call it before serving, or from `spawn_blocking`.
    ///
    /// # Errors
    /// [`SegmentError::Corrupt`] when a sealed segment (any but the last) has a bad header or frame, or the last
    /// one a bad header with frames after it: the caller should refuse to start. [`SegmentError::Io`] when the
    /// directory or a file cannot be read, created, cut or synced, or the thread cannot be started.
    pub fn open(config: SegmentsConfig) -> Result<Segments, SegmentError> {
        let dir = config.dir;
        let existed = dir.is_dir();
        create_private_dirs(&dir)?;
        if !existed && let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            // Best effort: the new directory's entry in its parent.
            let _ = sync_dir(parent);
        }
        tighten(&dir)?;
        let ids = list_segments(&dir)?;
        // Segments are only ever deleted oldest first: a gap is a file lost or moved away, and the records in
        // it (acknowledged writes among them) would be missing without a word.
        if let Some(w) = ids.windows(2).find(|w| w[1] != w[0] + 1) {
            return Err(SegmentError::Corrupt {
                path: segment_path(&dir, w[0] + 1),
                offset: 0,
                why: "this segment is missing between two others",
            });
        }
        let mut states = BTreeMap::new();
        let mut buf = Vec::new();
        let active = match ids.split_last() {
            Some((&last, sealed)) => {
                for &id in sealed {
                    let bytes = check_sealed(&dir, id, &mut buf)?;
                    states.insert(id, SegState { bytes, sealed: true });
                }
                open_last(&dir, last, &mut buf)?
            }
            None => create_segment(&dir, 1)?,
        };
        states.insert(active.id, SegState { bytes: active.len, sealed: false });
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            queue: Mutex::new(Queue { requests: VecDeque::new(), bytes: 0, closed: false, awaited: 0 }),
            ready: Condvar::new(),
            segments: Mutex::new(states),
            readers: Mutex::new(HashMap::new()),
            healthy: AtomicBool::new(true),
            #[cfg(test)]
            faults: tests::Faults::default(),
        });
        let writer = Writer {
            shared: shared.clone(),
            segment_bytes: config.segment_bytes,
            next_id: active.id + 1,
            active,
            broken: false,
            retry_at: None,
            retry_wait: FIRST_RETRY,
            fresh_segment_needed: false,
            buf: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("log-writer".to_owned())
            .spawn(move || writer.run())
            .map_err(|e| SegmentError::io(&dir, e))?;
        Ok(Segments { handle: Arc::new(Handle { shared, writer: Mutex::new(Some(thread)) }) })
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// Queues a request; checked and queued synchronously, so that the log's order is the order of the calls.
    fn submit(
        &self,
        records: Vec<Vec<u8>>,
        sync: SyncMode,
        reply: Option<Reply>,
        bounded: bool,
    ) -> Result<(), SegmentError> {
        if let Some(record) = records.iter().find(|r| r.len() > MAX_RECORD) {
            return Err(SegmentError::TooLarge(record.len()));
        }
        let bytes = records.iter().map(|r| FRAME_HEADER_BYTES + r.len() as u64).sum();
        let mut queue = lock(&self.shared().queue);
        if queue.closed {
            return Err(SegmentError::Closed);
        }
        if bounded && queue.bytes >= MAX_LAZY_BACKLOG {
            return Err(SegmentError::Backlog);
        }
        queue.bytes += bytes;
        // A lazy record alone does not wake the writer: it goes with the next awaited append or flush (under
        // load, one comes within the moment; otherwise the owner's periodic flush), so that it costs no thread
        // hand-off of its own. Past LAZY_WAKE_BYTES waiting, it wakes the writer anyway.
        let wake = reply.is_some() || queue.bytes >= LAZY_WAKE_BYTES;
        if reply.is_some() {
            queue.awaited += 1;
        }
        queue.requests.push_back(Request { records, sync, reply, bytes });
        drop(queue);
        if wake {
            self.shared().ready.notify_one();
        }
        Ok(())
    }

    /// Queues `records` and returns the receiver of their positions.
    fn request(
        &self,
        records: Vec<Vec<u8>>,
        sync: SyncMode,
    ) -> Result<oneshot::Receiver<Result<Vec<Position>, SegmentError>>, SegmentError> {
        let (reply, answer) = oneshot::channel();
        self.submit(records, sync, Some(reply), false)?;
        Ok(answer)
    }

    /// Queues `record` for the writer thread, at once (the log's order is the order of the calls; dropping the
    /// future does not take the record back), and resolves with its position once it is written, and fsynced
    /// for [`SyncMode::Now`].
    ///
    /// # Errors
    /// [`SegmentError::TooLarge`] (over [`MAX_RECORD`]) or [`SegmentError::Closed`], with nothing queued;
    /// [`SegmentError::Io`] when its batch failed: the record may or may not be in the log.
    pub fn append(
        &self,
        record: Vec<u8>,
        sync: SyncMode,
    ) -> impl Future<Output = Result<Position, SegmentError>> + Send + 'static {
        let answer = self.request(vec![record], sync);
        async move {
            let positions = answer?.await.map_err(|_| SegmentError::Closed)??;
            positions.first().copied().ok_or(SegmentError::Closed)
        }
    }

    /// Queues `records` to be appended contiguously (no other record between them), in order, like
    /// [`Segments::append`]; resolves with their positions, in the same order. They may span a segment boundary.
    ///
    /// # Errors
    /// As [`Segments::append`]; with [`SegmentError::TooLarge`] none of them is queued.
    pub fn append_many(
        &self,
        records: Vec<Vec<u8>>,
        sync: SyncMode,
    ) -> impl Future<Output = Result<Vec<Position>, SegmentError>> + Send + 'static {
        let answer = self.request(records, sync);
        async move { answer?.await.map_err(|_| SegmentError::Closed)? }
    }

    /// Queues `record` as a lazy append with no future to poll: it keeps its place relative to the caller's
    /// other appends, is written with the next batch and made durable by the next `Now` append or flush. A write
    /// failure is not reported to this caller (the next durable append or flush, and [`Segments::healthy`],
    /// report it). Never blocks.
    ///
    /// # Errors
    /// Nothing is queued on [`SegmentError::TooLarge`], [`SegmentError::Closed`], or [`SegmentError::Backlog`]
    /// (over [`MAX_LAZY_BACKLOG`] bytes waiting for the writer: the disk is not keeping up; await an
    /// [`Segments::append`] instead, or drop the record if it is advisory).
    pub fn append_lazy(&self, record: Vec<u8>) -> Result<(), SegmentError> {
        self.submit(vec![record], SyncMode::Lazy, None, true)
    }

    /// Resolves once everything queued before this call is durable.
    ///
    /// # Errors
    /// [`SegmentError::Closed`]; [`SegmentError::Io`] when the write or fsync failed.
    pub fn flush(&self) -> impl Future<Output = Result<(), SegmentError>> + Send + 'static {
        let answer = self.request(Vec::new(), SyncMode::Now);
        async move {
            answer?.await.map_err(|_| SegmentError::Closed)??;
            Ok(())
        }
    }

    /// Reads the record at `at` back and checks its checksum: a blocking `pread` (from the page cache when the
    /// record is recent), safe from any thread while the writer appends.
    ///
    /// # Errors
    /// [`SegmentError::NotFound`] when its segment was removed or the position lies past what was written;
    /// [`SegmentError::Corrupt`] when there is no valid frame there (a position not handed out by this log, or a
    /// damaged file); [`SegmentError::Io`] when the read fails.
    pub fn read(&self, at: Position) -> Result<Vec<u8>, SegmentError> {
        let shared = self.shared();
        let (end, cached) = {
            let segments = lock(&shared.segments);
            let Some(state) = segments.get(&at.segment) else { return Err(SegmentError::NotFound(at)) };
            (state.bytes, lock(&shared.readers).get(&at.segment).cloned())
        };
        if at.offset < HEADER_BYTES || at.offset.saturating_add(FRAME_HEADER_BYTES) > end {
            return Err(SegmentError::NotFound(at));
        }
        let path = segment_path(&shared.dir, at.segment);
        let file = match cached {
            Some(file) => file,
            None => {
                let file = match File::open(&path) {
                    Ok(file) => Arc::new(file),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(SegmentError::NotFound(at)),
                    Err(e) => return Err(SegmentError::io(&path, e)),
                };
                // Cached only if the segment is still there (`remove_before` empties the cache under this lock).
                let segments = lock(&shared.segments);
                if !segments.contains_key(&at.segment) {
                    return Err(SegmentError::NotFound(at));
                }
                lock(&shared.readers).entry(at.segment).or_insert(file).clone()
            }
        };
        let read_at = |buf: &mut [u8], offset: u64| match file.read_exact_at(buf, offset) {
            Ok(()) => Ok(()),
            // Cut under us by the repair after an I/O failure.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(SegmentError::NotFound(at)),
            Err(e) => Err(SegmentError::io(&path, e)),
        };
        let mut head = [0; FRAME_HEADER_BYTES as usize];
        read_at(&mut head, at.offset)?;
        let (len, crc) = parse_frame_header(head);
        let corrupt = |why| SegmentError::Corrupt { path: path.clone(), offset: at.offset, why };
        if len as usize > MAX_RECORD || at.offset + FRAME_HEADER_BYTES + u64::from(len) > end {
            return Err(corrupt("no frame starts at this position"));
        }
        let mut payload = vec![0; len as usize];
        read_at(&mut payload, at.offset + FRAME_HEADER_BYTES)?;
        if checksum(len, &payload) != crc {
            return Err(corrupt("checksum mismatch"));
        }
        Ok(payload)
    }

    /// Streams the log as it is now (every segment, each up to its current size), oldest record first, one
    /// record in memory at a time; for startup, right after [`Segments::open`]. Records appended after this call
    /// are not included. Blocking file I/O.
    pub fn replay(&self) -> Replay {
        Replay {
            dir: self.shared().dir.clone(),
            pending: self.segments().into_iter().map(|s| (s.id, s.bytes)).collect(),
            current: None,
            failed: false,
        }
    }

    /// Every segment, oldest first, with its size; the last one is the active one (`sealed == false`).
    pub fn segments(&self) -> Vec<SegmentInfo> {
        lock(&self.shared().segments)
            .iter()
            .map(|(&id, s)| SegmentInfo { id, bytes: s.bytes, sealed: s.sealed })
            .collect()
    }

    /// Deletes the sealed segments whose id is below `id` (never the active one), fsyncs the directory, and
    /// returns the bytes freed. Reads of their records then fail with [`SegmentError::NotFound`]. Blocking file
    /// I/O.
    ///
    /// # Errors
    /// [`SegmentError::Io`] when a file cannot be deleted (it is kept, and listed by [`Segments::segments`];
    /// the others may have been deleted) or the directory cannot be synced.
    pub fn remove_before(&self, id: u64) -> Result<u64, SegmentError> {
        let shared = self.shared();
        let doomed: Vec<(u64, SegState)> = {
            let mut segments = lock(&shared.segments);
            let ids: Vec<u64> = segments.range(..id).filter(|(_, s)| s.sealed).map(|(&id, _)| id).collect();
            let mut readers = lock(&shared.readers);
            ids.into_iter()
                .filter_map(|id| {
                    readers.remove(&id);
                    segments.remove(&id).map(|s| (id, s))
                })
                .collect()
        };
        if doomed.is_empty() {
            return Ok(0);
        }
        let mut freed = 0;
        let mut first_error = None;
        for (id, state) in doomed {
            let path = segment_path(&shared.dir, id);
            match fs::remove_file(&path) {
                Ok(()) => freed += state.bytes,
                Err(e) if e.kind() == io::ErrorKind::NotFound => freed += state.bytes,
                Err(e) => {
                    lock(&shared.segments).insert(id, state);
                    first_error.get_or_insert(SegmentError::io(&path, e));
                }
            }
        }
        sync_dir(&shared.dir)?;
        match first_error {
            Some(e) => Err(e),
            None => Ok(freed),
        }
    }

    /// The id of the active segment (where an append queued now will go, or a later one).
    pub fn active_id(&self) -> u64 {
        lock(&self.shared().segments).keys().next_back().copied().unwrap_or(1)
    }

    /// The total size of the segments on disk, in bytes.
    pub fn bytes(&self) -> u64 {
        lock(&self.shared().segments).values().map(|s| s.bytes).sum()
    }

    /// False after a failed write or fsync, until a later batch succeeds (for readiness checks).
    pub fn healthy(&self) -> bool {
        self.shared().healthy.load(Ordering::Relaxed)
    }

    /// Closes the log for every clone (later appends fail with [`SegmentError::Closed`]; reads still work), lets
    /// the writer thread write and fsync everything queued, and waits for it to finish. Blocking.
    pub fn close(self) {
        self.shared().close_queue();
        let writer = lock(&self.handle.writer).take();
        if let Some(thread) = writer
            && thread.join().is_err()
        {
            tracing::error!("the write log's writer thread panicked");
        }
    }
}

/// The records of the log, oldest first, as [`Segments::replay`] found it: `(position, record)`, or an error
/// after which the iteration ends.
pub struct Replay {
    dir: PathBuf,
    /// Segments still to read: id and size.
    pending: VecDeque<(u64, u64)>,
    current: Option<(u64, FrameReader)>,
    failed: bool,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay").field("dir", &self.dir).field("pending", &self.pending).finish_non_exhaustive()
    }
}

impl Replay {
    fn step(&mut self) -> Result<Option<(Position, Vec<u8>)>, SegmentError> {
        loop {
            let (id, reader) = match &mut self.current {
                Some((id, reader)) => (*id, reader),
                None => {
                    let Some((id, end)) = self.pending.pop_front() else { return Ok(None) };
                    let path = segment_path(&self.dir, id);
                    let file = File::open(&path).map_err(|e| SegmentError::io(&path, e))?;
                    if !header_ok(&file, &path, end)? {
                        return Err(SegmentError::Corrupt { path, offset: 0, why: "bad segment header" });
                    }
                    let reader = FrameReader::new(file, path, end)?;
                    let (id, reader) = self.current.insert((id, reader));
                    (*id, reader)
                }
            };
            let mut payload = Vec::new();
            match reader.next_frame(&mut payload)? {
                Frame::Record(offset) => return Ok(Some((Position { segment: id, offset }, payload))),
                Frame::End => self.current = None,
                Frame::Bad { offset, why } => {
                    return Err(SegmentError::Corrupt { path: reader.path.clone(), offset, why });
                }
            }
        }
    }
}

impl Iterator for Replay {
    type Item = Result<(Position, Vec<u8>), SegmentError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let step = self.step();
        self.failed = step.is_err();
        step.transpose()
    }
}

impl std::iter::FusedIterator for Replay {}

/// After a failed batch, the writer waits this long before it touches the disk again, doubling per failure up
/// to [`MAX_RETRY`]; batches queued meanwhile fail at once (their clients get `503`).
const FIRST_RETRY: std::time::Duration = std::time::Duration::from_millis(50);
/// The longest wait between two attempts after failures.
const MAX_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Failed batches, logged at most once a second.
static FAILED_BATCHES: crate::ratelog::Every = crate::ratelog::Every::new();

/// The active segment, as the writer sees it.
struct Active {
    id: u64,
    path: PathBuf,
    file: File,
    /// Bytes written successfully (the next frame's offset).
    len: u64,
    /// Bytes known to be on disk.
    synced: u64,
    /// Bytes whose records' positions were handed out (or, for lazy appends without a future, accepted).
    answered: u64,
}

/// The writer thread's state: it alone writes to the segment files.
struct Writer {
    shared: Arc<Shared>,
    segment_bytes: u64,
    active: Active,
    next_id: u64,
    /// The last batch failed: the active file may hold garbage after `active.len`.
    broken: bool,
    /// While broken: no new attempt before this instant (batches meanwhile fail at once, without I/O).
    retry_at: Option<tokio::time::Instant>,
    /// The wait after the next failure ([`FIRST_RETRY`] doubling up to [`MAX_RETRY`]).
    retry_wait: std::time::Duration,
    /// The repair dropped records whose positions were handed out: they must not be reused.
    fresh_segment_needed: bool,
    /// The batch's frames, reused.
    buf: Vec<u8>,
}

/// Marks the queue closed and drops what is left in it (its callers see [`SegmentError::Closed`]) when the
/// writer stops, even by a panic, so that no caller waits forever.
struct ExitGuard(Arc<Shared>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let mut queue = lock(&self.0.queue);
        queue.closed = true;
        queue.requests.clear();
        queue.bytes = 0;
    }
}

impl Writer {
    fn run(mut self) {
        let _guard = ExitGuard(self.shared.clone());
        while let Some(batch) = self.shared.next_batch() {
            self.handle(batch);
        }
        if !self.broken
            && self.active.synced < self.active.len
            && let Err(e) = self.active.file.sync_data()
        {
            tracing::error!(file = %self.active.path.display(), error = %e, "write log: the final fsync failed");
        }
    }

    fn handle(&mut self, batch: Vec<Request>) {
        // Only a durable write proves the log works again: an empty flush (cutting a tail back succeeds on a
        // full disk) or lazy bytes in the page cache do not.
        let proves = batch.iter().any(|r| r.sync == SyncMode::Now && !r.records.is_empty());
        let waiting = self.broken && self.retry_at.is_some_and(|at| tokio::time::Instant::now() < at);
        let result = if waiting {
            Err(SegmentError::Io {
                path: self.active.path.clone(),
                source: io::Error::other("waiting before the next attempt after an I/O failure"),
            })
        } else {
            self.write_batch(&batch)
        };
        match result {
            Ok(positions) => {
                if proves && !self.shared.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!("write log: records are stored again");
                }
                self.retry_at = None;
                self.retry_wait = FIRST_RETRY;
                for (request, positions) in batch.into_iter().zip(positions) {
                    if let Some(reply) = request.reply {
                        let _ = reply.send(Ok(positions));
                    }
                }
            }
            Err(e) => {
                if !waiting {
                    if let Some(failures) = FAILED_BATCHES.hit() {
                        tracing::error!(error = %e, failures, retry_in = ?self.retry_wait, "write log: writing failed; retrying with backoff");
                    }
                    self.retry_at = Some(tokio::time::Instant::now() + self.retry_wait);
                    self.retry_wait = (self.retry_wait * 2).min(MAX_RETRY);
                }
                self.shared.healthy.store(false, Ordering::Relaxed);
                self.broken = true;
                for request in batch {
                    if let Some(reply) = request.reply {
                        let _ = reply.send(Err(e.duplicate()));
                    }
                }
            }
        }
        if self.buf.capacity() > 2 * BATCH_BYTES as usize {
            self.buf = Vec::new();
        }
    }

    /// Writes the batch's frames (one write per segment touched), fsyncs if one of them asked for it, and
    /// returns each request's positions.
    fn write_batch(&mut self, batch: &[Request]) -> Result<Vec<Vec<Position>>, SegmentError> {
        if self.broken {
            self.repair()?;
            self.broken = false;
        }
        let durable = batch.iter().any(|r| r.sync == SyncMode::Now);
        self.buf.clear();
        let mut out = Vec::with_capacity(batch.len());
        for request in batch {
            let mut positions = Vec::with_capacity(request.records.len());
            for record in &request.records {
                let frame = FRAME_HEADER_BYTES + record.len() as u64;
                let end = self.active.len + self.buf.len() as u64;
                if end > HEADER_BYTES && end + frame > self.segment_bytes {
                    self.write_buf()?;
                    self.rotate()?;
                }
                let offset = self.active.len + self.buf.len() as u64;
                positions.push(Position { segment: self.active.id, offset });
                encode_frame(&mut self.buf, record);
            }
            out.push(positions);
        }
        self.write_buf()?;
        if durable {
            self.sync_active()?;
        }
        self.active.answered = self.active.len;
        self.publish();
        Ok(out)
    }

    /// Writes `buf` at the end of the active segment.
    fn write_buf(&mut self) -> Result<(), SegmentError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        #[cfg(test)]
        self.shared.faults.write().map_err(|e| SegmentError::io(&self.active.path, e))?;
        self.active
            .file
            .write_all_at(&self.buf, self.active.len)
            .map_err(|e| SegmentError::io(&self.active.path, e))?;
        self.active.len += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Makes what was written to the active segment durable (`fdatasync`), if anything is not yet.
    fn sync_active(&mut self) -> Result<(), SegmentError> {
        if self.active.synced < self.active.len {
            #[cfg(test)]
            self.shared.faults.sync().map_err(|e| SegmentError::io(&self.active.path, e))?;
            self.active.file.sync_data().map_err(|e| SegmentError::io(&self.active.path, e))?;
            self.active.synced = self.active.len;
        }
        Ok(())
    }

    /// Seals the active segment (fsynced whole first, so that a sealed segment never has a torn tail) and starts
    /// the next one.
    fn rotate(&mut self) -> Result<(), SegmentError> {
        self.sync_active()?;
        let next = create_segment(&self.shared.dir, self.next_id)?;
        self.next_id += 1;
        let old = std::mem::replace(&mut self.active, next);
        let mut segments = lock(&self.shared.segments);
        segments.insert(old.id, SegState { bytes: old.len, sealed: true });
        segments.insert(self.active.id, SegState { bytes: self.active.len, sealed: false });
        Ok(())
    }

    /// After a failure: cuts the active segment back to what is both synced and answered (dropping the failed
    /// batch's bytes, and unsynced lazy records whose pages may be gone), makes the cut durable, and starts a
    /// fresh segment if records already handed out were dropped.
    fn repair(&mut self) -> Result<(), SegmentError> {
        let active = &mut self.active;
        let cut = active.answered.min(active.synced);
        active.file.set_len(cut).map_err(|e| SegmentError::io(&active.path, e))?;
        active.file.sync_all().map_err(|e| SegmentError::io(&active.path, e))?;
        if active.answered > cut {
            tracing::warn!(
                file = %active.path.display(),
                offset = cut,
                dropped_bytes = active.answered - cut,
                "write log: lazy records not yet synced are dropped after the I/O failure, as a crash would"
            );
            self.fresh_segment_needed = true;
        }
        active.len = cut;
        active.synced = cut;
        active.answered = cut;
        self.publish();
        if self.fresh_segment_needed {
            self.rotate()?;
            self.fresh_segment_needed = false;
        }
        tracing::debug!(file = %self.active.path.display(), "write log: repaired after the I/O failure");
        Ok(())
    }

    /// Makes the active segment's size visible to readers.
    fn publish(&self) {
        lock(&self.shared.segments).insert(self.active.id, SegState { bytes: self.active.len, sealed: false });
    }
}

/// What the next frame of a segment is.
enum Frame {
    /// A valid record (in the payload buffer) whose frame starts at this offset.
    Record(u64),
    /// The end of the segment, at a frame boundary.
    End,
    /// Not a valid frame: a torn tail in the last segment, corruption in a sealed one.
    Bad { offset: u64, why: &'static str },
}

/// Reads a segment's frames in order, with constant memory beyond one record.
struct FrameReader {
    reader: BufReader<File>,
    path: PathBuf,
    offset: u64,
    end: u64,
}

impl FrameReader {
    /// A reader of the frames of `file` (whose header was checked), up to `end` bytes.
    fn new(mut file: File, path: PathBuf, end: u64) -> Result<Self, SegmentError> {
        file.seek(SeekFrom::Start(HEADER_BYTES)).map_err(|e| SegmentError::io(&path, e))?;
        Ok(FrameReader { reader: BufReader::with_capacity(READ_BUFFER, file), path, offset: HEADER_BYTES, end })
    }

    /// The next frame; a record's payload goes to `payload`. Stop at the first `Bad`.
    fn next_frame(&mut self, payload: &mut Vec<u8>) -> Result<Frame, SegmentError> {
        let offset = self.offset;
        let remaining = self.end.saturating_sub(offset);
        if remaining == 0 {
            return Ok(Frame::End);
        }
        if remaining < FRAME_HEADER_BYTES {
            return Ok(Frame::Bad { offset, why: "incomplete frame header" });
        }
        let mut head = [0; FRAME_HEADER_BYTES as usize];
        self.reader.read_exact(&mut head).map_err(|e| SegmentError::io(&self.path, e))?;
        let (len, crc) = parse_frame_header(head);
        if len as usize > MAX_RECORD {
            return Ok(Frame::Bad { offset, why: "record length over the maximum" });
        }
        if u64::from(len) > remaining - FRAME_HEADER_BYTES {
            return Ok(Frame::Bad { offset, why: "frame runs past the end of the file" });
        }
        payload.clear();
        payload.resize(len as usize, 0);
        self.reader.read_exact(payload).map_err(|e| SegmentError::io(&self.path, e))?;
        if checksum(len, payload) != crc {
            return Ok(Frame::Bad { offset, why: "checksum mismatch" });
        }
        self.offset += FRAME_HEADER_BYTES + u64::from(len);
        Ok(Frame::Record(offset))
    }
}

/// Checks a sealed segment whole; returns its size.
fn check_sealed(dir: &Path, id: u64, payload: &mut Vec<u8>) -> Result<u64, SegmentError> {
    let path = segment_path(dir, id);
    let file = File::open(&path).map_err(|e| SegmentError::io(&path, e))?;
    let len = file.metadata().map_err(|e| SegmentError::io(&path, e))?.len();
    if !header_ok(&file, &path, len)? {
        return Err(SegmentError::Corrupt { path, offset: 0, why: "bad segment header" });
    }
    let mut reader = FrameReader::new(file, path, len)?;
    loop {
        match reader.next_frame(payload)? {
            Frame::Record(_) => {}
            Frame::End => return Ok(len),
            Frame::Bad { offset, why } => return Err(SegmentError::Corrupt { path: reader.path, offset, why }),
        }
    }
}

/// Opens the last segment for appending: checks it, cuts a torn tail, and fsyncs what is kept.
fn open_last(dir: &Path, id: u64, payload: &mut Vec<u8>) -> Result<Active, SegmentError> {
    let path = segment_path(dir, id);
    let io = |e| SegmentError::io(&path, e);
    let file = OpenOptions::new().read(true).write(true).open(&path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut len = file_len;
    if !header_ok(&file, &path, file_len)? {
        if file_len > HEADER_BYTES {
            return Err(SegmentError::Corrupt { path, offset: 0, why: "bad segment header" });
        }
        // Too short to hold a record: its creation was interrupted.
        tracing::warn!(file = %path.display(), bytes = file_len, "write log: rewriting the header of an unfinished segment");
        file.set_len(0).map_err(io)?;
        file.write_all_at(&MAGIC, 0).map_err(io)?;
        file.sync_all().map_err(io)?;
        len = HEADER_BYTES;
    } else {
        let mut reader = FrameReader::new(file.try_clone().map_err(io)?, path.clone(), file_len)?;
        loop {
            match reader.next_frame(payload)? {
                Frame::Record(_) => {}
                Frame::End => break,
                Frame::Bad { offset, why } => {
                    let dropped = file_len - offset;
                    // A crash tears at most what was written since the last fsync: a batch, or the lazy records
                    // of about a second. Much more than that is damage, not a crash: refuse to cut it.
                    if dropped > MAX_TORN_TAIL {
                        return Err(SegmentError::Corrupt { path, offset, why });
                    }
                    // Kept aside, not destroyed: a flipped byte looks like a torn write, and what follows it may
                    // be worth recovering by hand.
                    let aside = path.with_extension(format!("seg.torn-{offset}"));
                    let mut tail = vec![0; usize::try_from(dropped).unwrap_or(0)];
                    file.read_exact_at(&mut tail, offset).map_err(io)?;
                    private_file(OpenOptions::new().write(true).create(true).truncate(true), &aside)?
                        .write_all_at(&tail, 0)
                        .map_err(|e| SegmentError::io(&aside, e))?;
                    tracing::warn!(
                        file = %path.display(),
                        offset,
                        dropped_bytes = dropped,
                        why,
                        kept_in = %aside.display(),
                        "write log: cutting a torn tail off the last segment (a crash in the middle of a write)"
                    );
                    file.set_len(offset).map_err(io)?;
                    file.sync_all().map_err(io)?;
                    len = offset;
                    break;
                }
            }
        }
    }
    // What the last run wrote may still be only in the page cache: make it durable before building on it.
    file.sync_data().map_err(io)?;
    Ok(Active { id, path, file, len, synced: len, answered: len })
}

/// Creates segment `id` (replacing a leftover of an earlier failed attempt): header written and synced, then the
/// directory synced, so that the file survives a crash. Removes the file again when that fails.
fn create_segment(dir: &Path, id: u64) -> Result<Active, SegmentError> {
    let path = segment_path(dir, id);
    let result = (|| {
        let io = |e| SegmentError::io(&path, e);
        let file = private_file(OpenOptions::new().read(true).write(true).create(true).truncate(true), &path)?;
        file.write_all_at(&MAGIC, 0).map_err(io)?;
        file.sync_data().map_err(io)?;
        sync_dir(dir)?;
        Ok(file)
    })();
    match result {
        Ok(file) => Ok(Active { id, path, file, len: HEADER_BYTES, synced: HEADER_BYTES, answered: HEADER_BYTES }),
        Err(e) => {
            let _ = fs::remove_file(&path);
            Err(e)
        }
    }
}

/// Creates `dir` and its missing parents, each [`DIR_MODE`] whatever the umask. Directories that exist are left
/// as they are (the operator's), except `dir` itself: see [`tighten`].
fn create_private_dirs(dir: &Path) -> Result<(), SegmentError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let missing: Vec<&Path> = dir.ancestors().take_while(|p| !p.as_os_str().is_empty() && !p.is_dir()).collect();
    for path in missing.into_iter().rev() {
        match fs::DirBuilder::new().mode(DIR_MODE).create(path) {
            Ok(()) => fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))
                .map_err(|e| SegmentError::io(path, e))?,
            // Made meanwhile by someone else: theirs.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
            Err(e) => return Err(SegmentError::io(path, e)),
        }
    }
    Ok(())
}

/// Opens (creating) the file at `path` with `options`, and sets it to [`FILE_MODE`] whatever the umask.
fn private_file(options: &mut OpenOptions, path: &Path) -> Result<File, SegmentError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |e| SegmentError::io(path, e);
    let file = options.mode(FILE_MODE).open(path).map_err(io)?;
    file.set_permissions(fs::Permissions::from_mode(FILE_MODE)).map_err(io)?;
    Ok(file)
}

/// The store's directory `dir` to [`DIR_MODE`] and every file in it to [`FILE_MODE`], where group or others
/// have any bit; warns once with how many were tightened.
fn tighten(dir: &Path) -> Result<(), SegmentError> {
    use std::os::unix::fs::PermissionsExt;
    fn io(path: &Path) -> impl FnOnce(io::Error) -> SegmentError + '_ {
        move |e| SegmentError::io(path, e)
    }
    let mut tightened = 0_u64;
    let mut fix = |path: &Path, meta: fs::Metadata, mode: u32| -> Result<(), SegmentError> {
        if meta.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io(path))?;
            tightened += 1;
        }
        Ok(())
    };
    fix(dir, fs::metadata(dir).map_err(io(dir))?, DIR_MODE)?;
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        // Not followed: a link in the store's directory is not the store's to change.
        let meta = fs::symlink_metadata(&path).map_err(io(&path))?;
        if meta.is_file() {
            fix(&path, meta, FILE_MODE)?;
        }
    }
    if tightened > 0 {
        tracing::warn!(
            dir = %dir.display(),
            tightened,
            "write log: the directory or files let group or others in (an earlier version made them so); \
             now 0700 and 0600"
        );
    }
    Ok(())
}

/// The ids of the segment files in `dir`, ascending; other files are ignored.
fn list_segments(dir: &Path) -> Result<Vec<u64>, SegmentError> {
    let io = |e| SegmentError::io(dir, e);
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let name = entry.map_err(io)?.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".seg")) else { continue };
        if stem.len() == 16
            && stem.bytes().all(|b| b.is_ascii_hexdigit())
            && let Ok(id) = u64::from_str_radix(stem, 16)
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Whether the file of `len` bytes starts with [`MAGIC`].
fn header_ok(file: &File, path: &Path, len: u64) -> Result<bool, SegmentError> {
    if len < HEADER_BYTES {
        return Ok(false);
    }
    let mut header = [0; MAGIC.len()];
    file.read_exact_at(&mut header, 0).map_err(|e| SegmentError::io(path, e))?;
    Ok(header == MAGIC)
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

fn sync_dir(dir: &Path) -> Result<(), SegmentError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| SegmentError::io(dir, e))
}

/// The frame checksum: CRC-32 (IEEE) of the length's four bytes, then the payload.
fn checksum(len: u32, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

fn parse_frame_header(head: [u8; FRAME_HEADER_BYTES as usize]) -> (u32, u32) {
    let [l0, l1, l2, l3, c0, c1, c2, c3] = head;
    (u32::from_le_bytes([l0, l1, l2, l3]), u32::from_le_bytes([c0, c1, c2, c3]))
}

/// Appends `record`'s frame to `buf`. The record is at most [`MAX_RECORD`] bytes (checked when it was queued).
fn encode_frame(buf: &mut Vec<u8>, record: &[u8]) {
    let len = record.len() as u32;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&checksum(len, record).to_le_bytes());
    buf.extend_from_slice(record);
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::atomic::{AtomicU32, AtomicU64};

    use super::*;

    /// How many of the writer's next writes and fsyncs fail.
    #[derive(Default)]
    pub(super) struct Faults {
        writes: AtomicU32,
        syncs: AtomicU32,
    }

    impl Faults {
        fn take(counter: &AtomicU32) -> io::Result<()> {
            match counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)) {
                Ok(_) => Err(io::Error::other("injected failure")),
                Err(_) => Ok(()),
            }
        }

        pub(super) fn write(&self) -> io::Result<()> {
            Self::take(&self.writes)
        }

        pub(super) fn sync(&self) -> io::Result<()> {
            Self::take(&self.syncs)
        }
    }

    /// A fresh directory under the system's temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("fanout-segments-{}-{name}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            TempDir(path)
        }

        fn config(&self, segment_bytes: u64) -> SegmentsConfig {
            SegmentsConfig { dir: self.0.join("log"), segment_bytes }
        }

        fn open(&self, segment_bytes: u64) -> Segments {
            Segments::open(self.config(segment_bytes)).expect("open")
        }

        fn segment(&self, id: u64) -> PathBuf {
            segment_path(&self.0.join("log"), id)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn replayed(log: &Segments) -> Vec<(Position, Vec<u8>)> {
        log.replay().collect::<Result<_, _>>().expect("replay")
    }

    fn record(i: usize) -> Vec<u8> {
        format!("record {i};").repeat(i % 7 + 1).into_bytes()
    }

    fn file_len(path: &Path) -> u64 {
        fs::metadata(path).expect("metadata").len()
    }

    /// Appends raw bytes to a file, as a crash in the middle of a write would leave them.
    fn append_raw(path: &Path, bytes: &[u8]) {
        let mut file = OpenOptions::new().append(true).open(path).expect("open for append");
        file.write_all(bytes).expect("write");
    }

    fn flip_byte(path: &Path, offset: u64) {
        let file = OpenOptions::new().read(true).write(true).open(path).expect("open");
        let mut byte = [0];
        file.read_exact_at(&mut byte, offset).expect("read");
        file.write_all_at(&[byte[0] ^ 0x40], offset).expect("write");
    }

    const AT_START: Position = Position { segment: 1, offset: HEADER_BYTES };

    #[tokio::test]
    async fn appends_read_back_and_reopen_in_order() {
        let tmp = TempDir::new("reopen");
        let log = tmp.open(1 << 20);
        assert!(replayed(&log).is_empty());
        let mut written = Vec::new();
        for i in 0..50 {
            let sync = if i % 3 == 0 { SyncMode::Now } else { SyncMode::Lazy };
            written.push((log.append(record(i), sync).await.expect("append"), record(i)));
        }
        let many: Vec<Vec<u8>> = (50..60).map(record).chain([Vec::new()]).collect();
        let positions = log.append_many(many.clone(), SyncMode::Now).await.expect("append_many");
        written.extend(positions.into_iter().zip(many));
        assert_eq!(written[0].0, AT_START);
        assert!(written.windows(2).all(|w| w[0].0 < w[1].0), "positions follow the order of the calls");
        for (at, bytes) in &written {
            assert_eq!(&log.read(*at).expect("read"), bytes);
        }
        let (last, _) = written[written.len() - 1];
        for nowhere in [
            Position { segment: 1, offset: 0 },
            Position { segment: 1, offset: log.bytes() },
            Position { segment: 9, offset: HEADER_BYTES },
        ] {
            assert!(matches!(log.read(nowhere), Err(SegmentError::NotFound(at)) if at == nowhere), "{nowhere:?}");
        }
        assert!(log.healthy());
        log.close();

        let log = tmp.open(1 << 20);
        assert_eq!(replayed(&log), written);
        for (at, bytes) in &written {
            assert_eq!(&log.read(*at).expect("read after reopen"), bytes);
        }
        let next = log.append(b"after reopen".to_vec(), SyncMode::Now).await.expect("append");
        assert!(next > last);
        log.close();
        let log = tmp.open(1 << 20);
        assert_eq!(replayed(&log).len(), written.len() + 1);
        log.close();
    }

    #[tokio::test]
    async fn rotates_at_segment_bytes() {
        let tmp = TempDir::new("rotate");
        // Frames of 8 + 30 bytes: a segment of 100 bytes holds the header and two of them.
        let log = tmp.open(100);
        for i in 0..5 {
            log.append_lazy(vec![i; 30]).expect("append_lazy");
        }
        log.flush().await.expect("flush");
        let expected = [
            SegmentInfo { id: 1, bytes: 84, sealed: true },
            SegmentInfo { id: 2, bytes: 84, sealed: true },
            SegmentInfo { id: 3, bytes: 46, sealed: false },
        ];
        assert_eq!(log.segments(), expected);
        assert_eq!(log.bytes(), 214);
        for info in expected {
            assert_eq!(file_len(&tmp.segment(info.id)), info.bytes);
        }
        let positions: Vec<Position> = replayed(&log).into_iter().map(|(at, _)| at).collect();
        let offsets: Vec<(u64, u64)> = positions.iter().map(|p| (p.segment, p.offset)).collect();
        assert_eq!(offsets, [(1, 8), (1, 46), (2, 8), (2, 46), (3, 8)]);

        // A record larger than a segment goes alone into one of its own.
        let big = log.append(vec![9; 200], SyncMode::Now).await.expect("big");
        assert_eq!(big, Position { segment: 4, offset: 8 });
        let after = log.append(vec![1; 30], SyncMode::Now).await.expect("after");
        assert_eq!(after, Position { segment: 5, offset: 8 });
        assert_eq!(file_len(&tmp.segment(4)), 8 + 208);
        assert_eq!(log.read(big).expect("read big"), vec![9; 200]);
        log.close();

        let log = tmp.open(100);
        assert_eq!(log.segments().len(), 5);
        assert_eq!(replayed(&log).len(), 7);
        log.close();
    }

    #[tokio::test]
    async fn remove_before_deletes_only_sealed_segments() {
        let tmp = TempDir::new("remove");
        let log = tmp.open(100);
        let mut positions = Vec::new();
        for i in 0..5 {
            positions.push(log.append(vec![i; 30], SyncMode::Lazy).await.expect("append"));
        }
        assert_eq!(log.remove_before(1).expect("remove nothing"), 0);
        assert_eq!(log.remove_before(3).expect("remove"), 84 + 84);
        assert_eq!(log.segments(), [SegmentInfo { id: 3, bytes: 46, sealed: false }]);
        assert!(!tmp.segment(1).exists() && !tmp.segment(2).exists());
        for &at in &positions[..4] {
            assert!(matches!(log.read(at), Err(SegmentError::NotFound(p)) if p == at));
        }
        assert_eq!(log.read(positions[4]).expect("read active"), vec![4; 30]);
        // The active segment is never removed.
        assert_eq!(log.remove_before(u64::MAX).expect("remove all"), 0);
        assert_eq!(log.bytes(), 46);
        let next = log.append(vec![5; 30], SyncMode::Now).await.expect("append after remove");
        log.close();

        let log = tmp.open(100);
        let records: Vec<Position> = replayed(&log).into_iter().map(|(at, _)| at).collect();
        assert_eq!(records, [positions[4], next]);
        log.close();
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_appends_go_on() {
        let tmp = TempDir::new("torn");
        let log = tmp.open(1 << 20);
        let mut written = Vec::new();
        for i in 0..3 {
            written.push((log.append(record(i), SyncMode::Now).await.expect("append"), record(i)));
        }
        log.close();
        let good = file_len(&tmp.segment(1));
        // A frame announcing 100 bytes of which 10 made it to disk.
        let mut partial = 100u32.to_le_bytes().to_vec();
        partial.extend_from_slice(&[0; 4]);
        partial.extend_from_slice(&[7; 10]);
        append_raw(&tmp.segment(1), &partial);

        let log = tmp.open(1 << 20);
        assert_eq!(replayed(&log), written);
        assert_eq!(file_len(&tmp.segment(1)), good);
        let next = log.append(b"after the tear".to_vec(), SyncMode::Now).await.expect("append");
        assert_eq!(next, Position { segment: 1, offset: good });
        written.push((next, b"after the tear".to_vec()));
        log.close();

        let log = tmp.open(1 << 20);
        assert_eq!(replayed(&log), written);
        log.close();
    }

    #[tokio::test]
    async fn a_damaged_last_frame_is_a_torn_tail() {
        let tmp = TempDir::new("flip-last");
        let log = tmp.open(1 << 20);
        let mut positions = Vec::new();
        for i in 0..3 {
            positions.push(log.append(record(i), SyncMode::Now).await.expect("append"));
        }
        log.close();
        flip_byte(&tmp.segment(1), file_len(&tmp.segment(1)) - 1);

        let log = tmp.open(1 << 20);
        let kept: Vec<Position> = replayed(&log).into_iter().map(|(at, _)| at).collect();
        assert_eq!(kept, positions[..2]);
        assert_eq!(file_len(&tmp.segment(1)), positions[2].offset);
        assert_eq!(log.append(record(9), SyncMode::Now).await.expect("append"), positions[2]);
        log.close();
    }

    /// Found by an attack run: a flipped byte in the last segment was cut as a torn tail and every record after
    /// it destroyed. What is cut is now kept beside the segment.
    #[tokio::test]
    async fn a_cut_tail_is_kept_aside() {
        let tmp = TempDir::new("aside");
        let log = tmp.open(1 << 20);
        let mut positions = Vec::new();
        for i in 0..5 {
            positions.push(log.append(record(i), SyncMode::Now).await.expect("append"));
        }
        log.close();
        let before = std::fs::read(tmp.segment(1)).expect("read");
        flip_byte(&tmp.segment(1), positions[1].offset + FRAME_HEADER_BYTES + 1);
        let log = tmp.open(1 << 20);
        assert_eq!(replayed(&log).len(), 1);
        log.close();
        let aside = tmp.segment(1).with_extension(format!("seg.torn-{}", positions[1].offset));
        let kept = std::fs::read(&aside).expect("the tail is kept aside");
        let from = usize::try_from(positions[1].offset).expect("offset");
        assert_eq!(kept.len(), before.len() - from);
        assert_eq!(kept[FRAME_HEADER_BYTES as usize + 2..], before[from + FRAME_HEADER_BYTES as usize + 2..]);
    }

    /// Found by an attack run: a segment deleted from the middle was not noticed, and the writes in it were
    /// missing without a word.
    #[tokio::test]
    async fn a_missing_middle_segment_is_corrupt() {
        let tmp = TempDir::new("gap");
        let log = tmp.open(256);
        for i in 0..20 {
            log.append(record(i), SyncMode::Now).await.expect("append");
        }
        assert!(log.segments().len() >= 3);
        log.close();
        std::fs::remove_file(tmp.segment(2)).expect("remove");
        let err = Segments::open(tmp.config(256)).expect_err("a gap is refused");
        assert!(matches!(err, SegmentError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[tokio::test]
    async fn a_zero_filled_tail_is_not_a_record() {
        let tmp = TempDir::new("zeros");
        let log = tmp.open(1 << 20);
        log.append(record(1), SyncMode::Now).await.expect("append");
        log.close();
        let good = file_len(&tmp.segment(1));
        // What a crash can leave when the file grew but its data never reached the disk.
        append_raw(&tmp.segment(1), &[0; 64]);

        let log = tmp.open(1 << 20);
        assert_eq!(replayed(&log).len(), 1);
        assert_eq!(file_len(&tmp.segment(1)), good);
        log.close();
    }

    #[tokio::test]
    async fn an_unfinished_new_segment_is_repaired() {
        let tmp = TempDir::new("unfinished");
        let log = tmp.open(1 << 20);
        log.append(record(1), SyncMode::Now).await.expect("append");
        log.close();
        // The crash came between creating segment 2 and writing its header.
        File::create(tmp.segment(2)).expect("create");

        let log = tmp.open(1 << 20);
        assert_eq!(log.segments()[1], SegmentInfo { id: 2, bytes: HEADER_BYTES, sealed: false });
        let at = log.append(record(2), SyncMode::Now).await.expect("append");
        assert_eq!(at, Position { segment: 2, offset: HEADER_BYTES });
        assert_eq!(replayed(&log).len(), 2);
        log.close();
    }

    #[tokio::test]
    async fn a_damaged_sealed_segment_is_corrupt() {
        let tmp = TempDir::new("flip-sealed");
        let log = tmp.open(100);
        for i in 0..5 {
            log.append(vec![i; 30], SyncMode::Now).await.expect("append");
        }
        log.close();
        // The payload of segment 1's second frame (at 46).
        flip_byte(&tmp.segment(1), 46 + 8 + 5);

        match Segments::open(tmp.config(100)) {
            Err(SegmentError::Corrupt { path, offset, why }) => {
                assert_eq!(path, tmp.segment(1));
                assert_eq!(offset, 46);
                assert_eq!(why, "checksum mismatch");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        // Nothing was cut.
        assert_eq!(file_len(&tmp.segment(1)), 84);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_durable_appends_all_resolve_and_read_back() {
        let tmp = TempDir::new("group");
        let log = tmp.open(64 * 1024);
        let tasks: Vec<_> = (0..100)
            .map(|task| {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut out = Vec::with_capacity(100);
                    for i in 0..100 {
                        let bytes = format!("task {task} record {i}").into_bytes();
                        out.push((log.append(bytes.clone(), SyncMode::Now).await?, bytes));
                    }
                    Ok::<_, SegmentError>(out)
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            let out = task.await.expect("task").expect("append");
            assert!(out.windows(2).all(|w| w[0].0 < w[1].0), "one task's appends stay in order");
            all.extend(out);
        }
        assert_eq!(all.len(), 10_000);
        for (at, bytes) in &all {
            assert_eq!(&log.read(*at).expect("read"), bytes);
        }
        all.sort();
        assert!(all.windows(2).all(|w| w[0].0 != w[1].0), "positions are unique");
        assert!(log.segments().len() > 1);
        assert!(log.healthy());
        log.close();

        let log = tmp.open(64 * 1024);
        assert_eq!(replayed(&log), all);
        log.close();
    }

    #[tokio::test]
    async fn lazy_appends_become_durable_with_a_later_sync_or_flush() {
        let tmp = TempDir::new("lazy");
        let log = tmp.open(1 << 20);
        for i in 0..10 {
            log.append_lazy(record(i)).expect("append_lazy");
        }
        let durable = log.append(b"durable".to_vec(), SyncMode::Now).await.expect("append");
        // A test cannot pull the power: a second open of the directory, without closing the first (whose close
        // would sync), shows that the lazy records were written, in order, before the fsync that answered.
        let second = tmp.open(1 << 20);
        let records = replayed(&second);
        second.close();
        let expected: Vec<Vec<u8>> = (0..10).map(record).chain([b"durable".to_vec()]).collect();
        assert_eq!(records.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(), expected);
        assert_eq!(records[10].0, durable);

        for i in 10..20 {
            log.append_lazy(record(i)).expect("append_lazy");
        }
        log.flush().await.expect("flush");
        let second = tmp.open(1 << 20);
        let records = replayed(&second);
        second.close();
        assert_eq!(records.len(), 21);
        assert_eq!(records[20].1, record(19));
        log.close();
    }

    /// A lazy record alone does not wake the writer (it costs no hand-off of its own): it is written with the
    /// next awaited append or flush.
    #[tokio::test]
    async fn lazy_records_wait_for_the_next_awaited_append() {
        let tmp = TempDir::new("lazy-wait");
        let log = tmp.open(1 << 20);
        log.append_lazy(record(1)).expect("append_lazy");
        // Give a (wrongly) woken writer ample time to write it: the file must still hold only its header.
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        #[expect(clippy::disallowed_methods, reason = "a real pause for the writer thread, on purpose")]
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(log.bytes(), HEADER_BYTES, "nothing written before an awaited append");
        log.flush().await.expect("flush");
        assert!(log.bytes() > HEADER_BYTES);
        log.close();
    }

    #[tokio::test]
    async fn records_over_the_maximum_are_refused() {
        let tmp = TempDir::new("too-large");
        let log = tmp.open(1 << 20);
        let big = vec![1; MAX_RECORD + 1];
        let too_large = |r: Result<_, SegmentError>| matches!(r, Err(SegmentError::TooLarge(n)) if n == MAX_RECORD + 1);
        assert!(too_large(log.append(big.clone(), SyncMode::Now).await.map(|_| ())));
        assert!(too_large(log.append_many(vec![b"ok".to_vec(), big.clone()], SyncMode::Now).await.map(|_| ())));
        assert!(too_large(log.append_lazy(big)));
        // Nothing was queued; a record of exactly the maximum goes.
        let at = log.append(vec![2; MAX_RECORD], SyncMode::Now).await.expect("largest record");
        assert_eq!(log.read(at).expect("read").len(), MAX_RECORD);
        assert_eq!(replayed(&log).len(), 1);
        log.close();
    }

    #[tokio::test]
    async fn a_closed_log_refuses_appends_and_still_reads() {
        let tmp = TempDir::new("closed");
        let log = tmp.open(1 << 20);
        let other = log.clone();
        let at = log.append(b"lazy".to_vec(), SyncMode::Lazy).await.expect("append");
        log.close();
        assert!(matches!(other.append(b"x".to_vec(), SyncMode::Now).await, Err(SegmentError::Closed)));
        assert!(matches!(other.append_lazy(b"x".to_vec()), Err(SegmentError::Closed)));
        assert!(matches!(other.flush().await, Err(SegmentError::Closed)));
        assert_eq!(other.read(at).expect("read"), b"lazy");
        drop(other);
        let log = tmp.open(1 << 20);
        assert_eq!(replayed(&log), [(at, b"lazy".to_vec())]);
        log.close();
    }

    #[tokio::test]
    async fn a_failed_write_is_reported_and_the_next_batch_goes_on() {
        let tmp = TempDir::new("failed-write");
        let log = tmp.open(1 << 20);
        let first = log.append(record(1), SyncMode::Now).await.expect("append");
        let end = log.bytes();
        log.shared().faults.writes.store(1, Ordering::Relaxed);
        assert!(matches!(log.append(record(2), SyncMode::Now).await, Err(SegmentError::Io { .. })));
        assert!(!log.healthy());
        // No position beyond the synced length was handed out: the segment goes on where it was (once the
        // writer's wait after the failure is over).
        let next = append_after_failure(&log, record(3)).await;
        assert_eq!(next, Position { segment: 1, offset: end });
        assert!(log.healthy());
        log.close();

        let log = tmp.open(1 << 20);
        assert_eq!(replayed(&log), [(first, record(1)), (next, record(3))]);
        log.close();
    }

    /// Appends `r` durably, retrying while the writer waits after a failure (each retry's batch fails at once,
    /// without touching the disk, until [`FIRST_RETRY`] has passed).
    async fn append_after_failure(log: &Segments, r: Vec<u8>) -> Position {
        for _ in 0..200 {
            match log.append(r.clone(), SyncMode::Now).await {
                Ok(at) => return at,
                Err(SegmentError::Io { source, .. }) if source.to_string().contains("waiting before") => {
                    assert!(!log.healthy());
                    tokio::time::sleep(FIRST_RETRY / 2).await;
                }
                Err(e) => panic!("append after the failure: {e}"),
            }
        }
        panic!("the writer never tried again");
    }

    #[tokio::test]
    async fn a_failed_fsync_drops_unsynced_lazy_records_and_never_reuses_their_positions() {
        let tmp = TempDir::new("failed-sync");
        let log = tmp.open(1 << 20);
        let first = log.append(record(1), SyncMode::Now).await.expect("append");
        let lazy = log.append(record(2), SyncMode::Lazy).await.expect("lazy append");
        log.shared().faults.syncs.store(1, Ordering::Relaxed);
        assert!(matches!(log.append(record(3), SyncMode::Now).await, Err(SegmentError::Io { .. })));
        assert!(!log.healthy());
        let next = append_after_failure(&log, record(4)).await;
        assert!(log.healthy());
        // The lazy record may not have reached the disk: it is dropped (as a crash would), segment 1 is cut back
        // to its last sync and sealed, and the log goes on in a fresh segment.
        assert_eq!(next, Position { segment: 2, offset: HEADER_BYTES });
        assert!(matches!(log.read(lazy), Err(SegmentError::NotFound(_))));
        assert_eq!(log.segments()[0], SegmentInfo { id: 1, bytes: lazy.offset, sealed: true });
        log.close();

        let log = tmp.open(1 << 20);
        assert_eq!(replayed(&log), [(first, record(1)), (next, record(4))]);
        log.close();
    }
}
