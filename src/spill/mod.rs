//! Transaction bodies that may outgrow memory: a [`ChangeLog`] keeps the
//! first changes in memory and appends the rest to a file under the spill
//! directory, so a transaction of any size can be held whole until its
//! commit is known and judged.
//!
//! ```text
//!  hub / change stage ──push(tag, Change)──▶ ChangeLog ──▶ memory (≤ memory budget)
//!                                                     └─▶ <data dir>/spill/<pid>-<n>.spill (rest)
//!  at commit ──seal(), read(cursor)──▶ every change in push order (memory part, then the file)
//! ```
//!
//! Invariants:
//! - order is push order; any number of [`Cursor`]s may read a log (each reads the file with positioned reads), e.g. one pass for the
//!   membership changes and one for the fan-out;
//! - disk use is shared by every log of one [`Spill`] and never exceeds its
//!   budget: a push that would exceed it is refused with
//!   [`SpillError::DiskBudget`] and hands the change back, so the caller can
//!   pause and retry — nothing is ever dropped;
//! - a log's file is removed when the log is dropped; files left by a
//!   process that died are removed by [`Spill::new`] at the next start;
//! - the file format is private to one process run (relations are indices
//!   into the log's own table), so it carries no version.

mod codec;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::change::{Change, RelationInfo};

/// Errors of the spill layer.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    /// The spill directory could not be created, written or read (definite:
    /// the operator must fix the directory or the disk).
    #[error(
        "spill file {path}: {source}; check that the spill directory is writable and the disk has room (--data-dir)"
    )]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The disk budget is used up (transient: the caller pauses and retries;
    /// the slot keeps the WAL meanwhile).
    #[error("spill disk budget of {budget} bytes reached; the pipeline pauses until spilled transactions finish (raise --spill-budget)")]
    DiskBudget {
        /// The budget.
        budget: u64,
    },
    /// Another walcast (or relay) uses the directory (definite).
    #[error("spill directory {dir} is in use by another walcast process; give each its own --spill-dir")]
    InUse {
        /// The directory.
        dir: PathBuf,
    },
    /// A spill file did not read back as written (definite: a bug or a
    /// damaged disk).
    #[error("spill file {path} is corrupt at byte {offset}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where.
        offset: u64,
    },
}

impl SpillError {
    /// Whether waiting can clear it.
    pub fn is_transient(&self) -> bool {
        matches!(self, SpillError::DiskBudget { .. })
    }
}

/// Spill settings.
#[derive(Debug, Clone)]
pub struct SpillConfig {
    /// Directory for spill files (created when missing).
    pub dir: PathBuf,
    /// Most bytes on disk across every log, default 8 GiB.
    pub disk_budget: u64,
}

/// Default disk budget: 8 GiB.
pub const DEFAULT_DISK_BUDGET: u64 = 8 << 30;

/// Counters of one [`Spill`], readable while it runs.
#[derive(Debug, Default)]
pub struct SpillStats {
    /// Bytes on disk now (gauge).
    pub disk_bytes: AtomicU64,
    /// Bytes ever written to spill files.
    pub written_bytes: AtomicU64,
    /// Logs that went to disk.
    pub spilled_logs: AtomicU64,
    /// Pushes refused by the disk budget (each one pauses its stage).
    pub budget_waits: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    budget: u64,
    next: AtomicU64,
    stats: Arc<SpillStats>,
    /// The directory's lock file, held (flock) while this spill lives.
    _lock: Option<File>,
}

impl Drop for Shared {
    /// A spill under a [`temporary_dir`] of this process removes its
    /// directory (and the temporary one, once empty); configured
    /// directories stay.
    fn drop(&mut self) {
        if self._lock.is_none() {
            return;
        }
        let prefix = format!("walcast-spill-{}-", std::process::id());
        let tmp = std::env::temp_dir();
        let Some(root) = self.dir.ancestors().find(|a| {
            a.parent() == Some(tmp.as_path()) && a.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        }) else {
            return;
        };
        let _ = std::fs::remove_dir_all(&self.dir);
        if root != self.dir {
            let _ = std::fs::remove_dir(root);
        }
    }
}

/// Takes `<dir>/lock` exclusively, so two processes (or two relays in one
/// process) never share a spill directory and remove each other's files.
fn lock_dir(dir: &Path) -> Result<File, SpillError> {
    use std::os::fd::AsRawFd;
    let path = dir.join("lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| SpillError::Io { path: path.clone(), source })?;
    // SAFETY: flock on a file descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(SpillError::InUse { dir: dir.to_owned() });
    }
    Ok(file)
}

/// The spill directory with its shared disk budget. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Spill {
    shared: Arc<Shared>,
}

impl Spill {
    /// Creates the directory and removes spill files a previous run left.
    ///
    /// # Errors
    /// [`SpillError::Io`] when the directory cannot be created or read.
    pub fn new(config: SpillConfig) -> Result<Spill, SpillError> {
        let io = |source| SpillError::Io { path: config.dir.clone(), source };
        std::fs::create_dir_all(&config.dir).map_err(io)?;
        let lock = lock_dir(&config.dir)?;
        let mut removed = 0usize;
        for entry in std::fs::read_dir(&config.dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.extension().is_some_and(|e| e == "spill") {
                std::fs::remove_file(&path).map_err(|source| SpillError::Io { path: path.clone(), source })?;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(removed, dir = %config.dir.display(), "removed spill files left by an earlier run");
        }
        Ok(Spill {
            shared: Arc::new(Shared {
                dir: config.dir,
                budget: config.disk_budget,
                next: AtomicU64::new(0),
                stats: Arc::new(SpillStats::default()),
                _lock: Some(lock),
            }),
        })
    }

    /// A spill in a fresh temporary directory (tests, benchmarks, replay).
    /// The directory lives as long as the process.
    pub fn temporary() -> Spill {
        Spill::new(SpillConfig { dir: temporary_dir(), disk_budget: DEFAULT_DISK_BUDGET })
            .unwrap_or_else(|err| panic!("temporary spill directory: {err}"))
    }
}

/// A directory of its own under the system's temporary directory (one per
/// call), for spills of tools, tests and relays without a configured one.
pub fn temporary_dir() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!("walcast-spill-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)))
}

impl Spill {
    /// A spill with no directory and no disk budget, for logs whose memory
    /// budget is unbounded (a push that would go to disk is refused as
    /// [`SpillError::DiskBudget`]). Touches no file system.
    pub fn memory_only() -> Spill {
        Spill {
            shared: Arc::new(Shared {
                dir: PathBuf::new(),
                budget: 0,
                next: AtomicU64::new(0),
                stats: Arc::new(SpillStats::default()),
                _lock: None,
            }),
        }
    }

    /// Counters.
    pub fn stats(&self) -> &Arc<SpillStats> {
        &self.shared.stats
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// An empty log holding up to `memory_bytes` (as
    /// [`Change::byte_size`] counts) in memory.
    pub fn log(&self, memory_bytes: usize) -> ChangeLog {
        ChangeLog {
            spill: self.clone(),
            memory_bytes,
            mem: Vec::new(),
            mem_size: 0,
            file: None,
            len: 0,
            relations: Vec::new(),
            relation_index: HashMap::new(),
            discarded: HashSet::new(),
        }
    }
}

#[derive(Debug)]
struct SpillFile {
    path: PathBuf,
    writer: BufWriter<File>,
    /// Bytes written (and reserved from the budget).
    size: u64,
}

/// One transaction body: changes with a tag each (the hub uses 0, the
/// change stage the subtransaction id), in push order.
#[derive(Debug)]
pub struct ChangeLog {
    spill: Spill,
    memory_bytes: usize,
    mem: Vec<(u32, Change)>,
    mem_size: usize,
    file: Option<SpillFile>,
    len: usize,
    relations: Vec<Arc<RelationInfo>>,
    relation_index: HashMap<usize, u32>,
    /// Tags whose spilled changes readers skip.
    discarded: HashSet<u32>,
}

impl ChangeLog {
    /// Discards every change pushed so far with `tag` (a subtransaction's
    /// Stream Abort): in-memory ones at once, spilled ones are skipped by
    /// readers. Changes pushed later with the same tag are kept.
    pub fn discard(&mut self, tag: u32) {
        let before = self.mem.len();
        self.mem.retain(|(t, _)| *t != tag);
        if self.mem.len() != before {
            self.mem_size = self.mem.iter().map(|(_, c)| c.byte_size()).sum();
            self.len -= before - self.mem.len();
        }
        if self.file.is_some() {
            // Later pushes with this tag go to the file too and would be
            // skipped; such reuse does not happen (a subtransaction id is
            // not reused within its top-level transaction).
            self.discarded.insert(tag);
        }
    }

    /// Changes pushed, less those discarded while in memory.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held in memory (as [`Change::byte_size`] counts).
    pub fn memory_size(&self) -> usize {
        self.mem_size
    }

    /// Bytes on disk.
    pub fn disk_size(&self) -> u64 {
        self.file.as_ref().map_or(0, |f| f.size)
    }

    /// Whether part of the log is on disk.
    pub fn spilled(&self) -> bool {
        self.file.is_some()
    }

    /// Appends a change.
    ///
    /// # Errors
    /// [`SpillError::DiskBudget`] (transient) hands the change back: retry
    /// later. [`SpillError::Io`] is definite.
    // The change handed back is what makes the refusal retryable; boxing it
    // would allocate on the one path that must not lose it.
    #[allow(clippy::result_large_err)]
    pub fn push(&mut self, tag: u32, change: Change) -> Result<(), (SpillError, Option<Change>)> {
        let size = change.byte_size();
        if self.file.is_none() && self.mem_size + size <= self.memory_bytes {
            self.mem_size += size;
            self.mem.push((tag, change));
            self.len += 1;
            return Ok(());
        }
        let rel = self.relation(&change.relation);
        let mut buf = BytesMut::new();
        codec::encode(tag, rel, &change, &mut buf);
        let need = buf.len() as u64;
        let stats = Arc::clone(&self.spill.shared.stats);
        let budget = self.spill.shared.budget;
        // Reserve before writing, so concurrent logs never overshoot.
        let reserved = stats
            .disk_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| (used + need <= budget).then_some(used + need));
        if reserved.is_err() {
            stats.budget_waits.fetch_add(1, Ordering::Relaxed);
            return Err((SpillError::DiskBudget { budget }, Some(change)));
        }
        if let Err(err) = self.write(&buf) {
            stats.disk_bytes.fetch_sub(need, Ordering::AcqRel);
            return Err((err, None));
        }
        stats.written_bytes.fetch_add(need, Ordering::Relaxed);
        self.len += 1;
        Ok(())
    }

    fn write(&mut self, buf: &[u8]) -> Result<(), SpillError> {
        if self.file.is_none() {
            let shared = &self.spill.shared;
            let n = shared.next.fetch_add(1, Ordering::Relaxed);
            let path = shared.dir.join(format!("{}-{n}.spill", std::process::id()));
            let file = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|source| SpillError::Io { path: path.clone(), source })?;
            shared.stats.spilled_logs.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(path = %path.display(), "transaction spilled to disk");
            self.file = Some(SpillFile { path, writer: BufWriter::with_capacity(64 << 10, file), size: 0 });
        }
        let file = self.file.as_mut().expect("just opened");
        file.writer.write_all(buf).map_err(|source| SpillError::Io { path: file.path.clone(), source })?;
        file.size += buf.len() as u64;
        Ok(())
    }

    fn relation(&mut self, relation: &Arc<RelationInfo>) -> u32 {
        let key = Arc::as_ptr(relation) as usize;
        if let Some(&i) = self.relation_index.get(&key) {
            return i;
        }
        let i = self.relations.len() as u32;
        self.relations.push(Arc::clone(relation));
        self.relation_index.insert(key, i);
        i
    }

    /// Makes everything pushed so far readable (flushes buffered writes).
    /// Call it once pushing is done, before reading.
    ///
    /// # Errors
    /// [`SpillError::Io`] when the flush fails.
    pub fn seal(&mut self) -> Result<(), SpillError> {
        if let Some(file) = self.file.as_mut() {
            file.writer.flush().map_err(|source| SpillError::Io { path: file.path.clone(), source })?;
        }
        Ok(())
    }

    /// The change at `cursor` and its tag, advancing the cursor; `None` at
    /// the end. Changes still in memory are lent, spilled ones decoded.
    /// Read only after [`ChangeLog::seal`].
    ///
    /// # Errors
    /// [`SpillError::Io`] or [`SpillError::Corrupt`].
    pub fn read(&self, cursor: &mut Cursor) -> Result<Option<(u32, Cow<'_, Change>)>, SpillError> {
        if let Some((tag, change)) = self.mem.get(cursor.next_mem) {
            cursor.next_mem += 1;
            return Ok(Some((*tag, Cow::Borrowed(change))));
        }
        let Some(file) = self.file.as_ref() else { return Ok(None) };
        loop {
            if let Some(len) = codec::frame_len(&cursor.buf) {
                if cursor.buf.len() >= len {
                    let at = cursor.offset - cursor.buf.len() as u64;
                    let record: Bytes = cursor.buf.split_to(len).freeze();
                    match codec::decode(&record, &self.relations) {
                        Some((tag, _)) if self.discarded.contains(&tag) => continue,
                        Some((tag, change)) => return Ok(Some((tag, Cow::Owned(change)))),
                        None => return Err(SpillError::Corrupt { path: file.path.clone(), offset: at }),
                    }
                }
            }
            if cursor.offset >= file.size {
                return if cursor.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(SpillError::Corrupt { path: file.path.clone(), offset: cursor.offset })
                };
            }
            let want = READ_CHUNK.min((file.size - cursor.offset) as usize);
            let start = cursor.buf.len();
            cursor.buf.resize(start + want, 0);
            file.writer
                .get_ref()
                .read_exact_at(&mut cursor.buf[start..], cursor.offset)
                .map_err(|source| SpillError::Io { path: file.path.clone(), source })?;
            cursor.offset += want as u64;
        }
    }
}

impl Drop for ChangeLog {
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            self.spill.shared.stats.disk_bytes.fetch_sub(file.size, Ordering::AcqRel);
            drop(file.writer);
            if let Err(err) = std::fs::remove_file(&file.path) {
                tracing::warn!(path = %file.path.display(), error = %err, "could not remove a spill file");
            }
        }
    }
}

/// A position in a [`ChangeLog`]; any number may read one log.
#[derive(Debug, Default)]
pub struct Cursor {
    next_mem: usize,
    offset: u64,
    buf: BytesMut,
}

/// How much a cursor asks the file for at once.
const READ_CHUNK: usize = 256 << 10;

#[cfg(test)]
mod tests;
