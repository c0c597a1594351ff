//! The journal: open/recover, group commit, reads, checkpoints.
//!
//! Directory layout:
//!
//! ```text
//! DIR/LOCK         flock(2)ed by the one process that has the journal open
//! DIR/CHECKPOINT   format version + the seq up to which sled is durable
//! DIR/wal/*.wal    write-ahead log segments (see crate::wal)
//! DIR/sled/        the materialized state (sled 0.34)
//! ```
//!
//! A commit appends one frame to the newest WAL segment, waits for a shared
//! `fdatasync` (group commit: one leader syncs for everyone who appended
//! before it started), applies the operations to an in-memory table (the
//! memtable), and only then returns. Reads look at the memtable first, then
//! at sled. sled is never written on the commit path: a background
//! checkpoint freezes the memtable, applies it to sled in one batch per tree,
//! flushes sled and fsyncs its files, records the checkpoint and deletes the
//! WAL segments it covers. Opening replays every WAL frame after the
//! checkpoint into the memtable.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::net::IpAddr;
use std::ops::Bound;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use ipnet::IpNet;

use crate::codec::{self, WalOpV1};
use crate::durable;
use crate::envelope::{DecodeError, FORMAT_VERSION, OLDEST_FORMAT_VERSION};
use crate::error::{JournalError, Result};
use crate::model::*;
use crate::wal;
use crate::Tree;

const META_NODE: &[u8] = b"node";
const META_INTENT_HWM: &[u8] = b"intent_hwm";
const CHECKPOINT_FILE: &str = "CHECKPOINT";

/// Test-only failpoint (read at open, and only in builds with the
/// `failpoints` feature): after this many successful WAL fdatasyncs counted
/// from the open, the next one fails as if the disk had returned EIO. See
/// [`Journal::inject_sync_failure`].
pub const FAIL_SYNC_AFTER_ENV: &str = "COIL_JOURNAL_FAIL_SYNC_AFTER";

/// `Inner::sync_failure_after` when no failure is armed.
const DISARMED: u64 = u64::MAX;

/// More valid frames than this after a damaged one cannot be the unsynced
/// tail of one group commit (a group is one frame per concurrent committer):
/// that is damage in the middle of the log, and opening refuses it. (Format 2
/// frames also prove it exactly: see [`JournalError::AcknowledgedDamage`].)
pub const MAX_UNSYNCED_FRAMES: usize = 128;

/// What to do with a damaged WAL when opening.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// A damaged frame at the end of the newest segment is a write that was
    /// in flight when the process or machine died: it was never acknowledged,
    /// so it is cut off (and reported). Damage anywhere else, or damage that
    /// a later intact frame proves was acknowledged, is an error.
    #[default]
    TolerateTornTail,
    /// Any damaged frame is an error.
    Strict,
}

/// How to open a journal.
#[derive(Debug, Clone)]
pub struct JournalOptions {
    /// WAL bytes after which a background checkpoint runs. This also bounds
    /// the memtable (what is durable in the WAL but not yet in sled).
    pub checkpoint_bytes: u64,
    pub recovery: RecoveryMode,
    /// Open without writing anything of ours: no torn-tail truncation, no new
    /// segment, no checkpoint, and commits are refused. (sled still replays
    /// its own log when it opens.) Used by `coilctl journal dump/verify`.
    pub read_only: bool,
    /// sled's page cache budget.
    pub cache_bytes: u64,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            checkpoint_bytes: 4 << 20,
            recovery: RecoveryMode::TolerateTornTail,
            read_only: false,
            cache_bytes: 8 << 20,
        }
    }
}

/// A damaged WAL tail that was cut off at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub segment: PathBuf,
    pub offset: u64,
    pub dropped_bytes: u64,
    pub reason: String,
    /// Frames after the damage that did decode (unacknowledged writes of the
    /// same group-commit window, or damage: see docs/journal.md).
    pub later_valid_frames: usize,
}

/// What opening found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// The journal did not exist and was created.
    pub created: bool,
    /// Sequence number covered by the last checkpoint.
    pub checkpoint_seq: u64,
    /// Last sequence number in the journal after replay.
    pub last_seq: u64,
    /// WAL batches replayed into sled.
    pub replayed_batches: u64,
    /// Torn tails cut off (or, read-only, found).
    pub torn_tails: Vec<TornTail>,
    /// Segments removed because a checkpoint already covered them.
    pub removed_segments: usize,
    /// Wall time of the open, in microseconds.
    pub open_us: u64,
}

/// Size figures of a journal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalStats {
    pub last_seq: u64,
    /// WAL fdatasyncs since open. With concurrent committers this grows
    /// slower than the number of commits (group commit).
    pub syncs: u64,
    /// Commits since open.
    pub commits: u64,
    pub checkpoint_seq: u64,
    pub wal_segments: usize,
    pub wal_bytes: u64,
}

/// A set of operations committed atomically: after a crash either all of
/// them are visible or none is.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    ops: Vec<WalOpV1>,
    max_intent: u64,
    invalid: Option<String>,
}

impl Batch {
    pub fn new() -> Self {
        Batch::default()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    fn put(&mut self, tree: Tree, key: Vec<u8>, value: Vec<u8>) -> &mut Self {
        self.ops.push(WalOpV1 {
            tree: tree.id(),
            key,
            value: Some(value),
        });
        self
    }

    fn del(&mut self, tree: Tree, key: Vec<u8>) -> &mut Self {
        self.ops.push(WalOpV1 {
            tree: tree.id(),
            key,
            value: None,
        });
        self
    }

    fn refuse(&mut self, why: String) -> &mut Self {
        if self.invalid.is_none() {
            self.invalid = Some(why);
        }
        self
    }

    pub fn put_node_meta(&mut self, m: &NodeMeta) -> &mut Self {
        self.put(Tree::Meta, META_NODE.to_vec(), codec::encode_node_meta(m))
    }

    pub fn put_lease(&mut self, l: &BlockLease) -> &mut Self {
        if l.block != l.block.trunc() {
            return self.refuse(format!("lease block {} has host bits set", l.block));
        }
        self.put(
            Tree::Leases,
            codec::net_key(l.block),
            codec::encode_lease(l),
        )
    }

    pub fn delete_lease(&mut self, block: IpNet) -> &mut Self {
        self.del(Tree::Leases, codec::net_key(block))
    }

    pub fn put_attachment(&mut self, a: &Attachment) -> &mut Self {
        if let Err(e) = codec::validate_key(&a.key.network, &a.key.container_id, &a.key.ifname) {
            return self.refuse(e);
        }
        if let Some(x) = a.addresses.iter().find(|x| !x.block.contains(&x.addr)) {
            return self.refuse(format!(
                "attachment {}: address {} outside its block {}",
                a.key, x.addr, x.block
            ));
        }
        self.put(
            Tree::Attachments,
            codec::attachment_key(&a.key),
            codec::encode_attachment(a),
        )
    }

    pub fn delete_attachment(&mut self, key: &AttachmentKey) -> &mut Self {
        self.del(Tree::Attachments, codec::attachment_key(key))
    }

    pub fn put_intent(&mut self, i: &Intent) -> &mut Self {
        self.max_intent = self.max_intent.max(i.id);
        self.put(
            Tree::Intents,
            i.id.to_be_bytes().to_vec(),
            codec::encode_intent(i),
        )
    }

    pub fn delete_intent(&mut self, id: u64) -> &mut Self {
        self.del(Tree::Intents, id.to_be_bytes().to_vec())
    }

    pub fn put_address(&mut self, addr: IpAddr, e: &AddressEntry) -> &mut Self {
        if !e.block.contains(&addr) {
            return self.refuse(format!("address {addr} outside its block {}", e.block));
        }
        if let Err(why) = codec::validate_key(
            &e.attachment.network,
            &e.attachment.container_id,
            &e.attachment.ifname,
        ) {
            return self.refuse(why);
        }
        self.put(
            Tree::Addresses,
            codec::addr_key(addr),
            codec::encode_address(e),
        )
    }

    pub fn delete_address(&mut self, addr: IpAddr) -> &mut Self {
        self.del(Tree::Addresses, codec::addr_key(addr))
    }

    /// Puts an opaque entry of the embedded cluster store. The journal
    /// checksums and versions it like every record but does not interpret
    /// the value.
    pub fn put_store(&mut self, key: &[u8], value: &[u8]) -> &mut Self {
        if let Err(why) = codec::validate_store_key(key) {
            return self.refuse(why);
        }
        if value.len() > codec::MAX_STORE_VALUE {
            return self.refuse(format!(
                "store value for {} is {} bytes, over the {} byte limit",
                String::from_utf8_lossy(key),
                value.len(),
                codec::MAX_STORE_VALUE
            ));
        }
        self.put(Tree::Store, key.to_vec(), codec::encode_store(value))
    }

    pub fn delete_store(&mut self, key: &[u8]) -> &mut Self {
        self.del(Tree::Store, key.to_vec())
    }
}

/// What a commit produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitInfo {
    /// The batch's sequence number in the WAL.
    pub seq: u64,
}

/// A record that did not decode, found by [`Journal::dump`] or [`Journal::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptRecord {
    pub key: String,
    pub reason: String,
}

/// Everything in a journal, decoded; what did not decode is listed apart.
#[derive(Debug, Clone, Default)]
pub struct Dump {
    pub node: Option<NodeMeta>,
    pub intent_hwm: u64,
    pub leases: Vec<BlockLease>,
    pub attachments: Vec<Attachment>,
    pub intents: Vec<Intent>,
    pub addresses: Vec<(IpAddr, AddressEntry)>,
    /// Embedded cluster store entries: key and value length.
    pub store: Vec<(String, usize)>,
    pub corrupt: Vec<CorruptRecord>,
    pub stats: JournalStats,
}

/// The result of [`Journal::verify`].
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Records that failed their envelope or type checks.
    pub corrupt: Vec<CorruptRecord>,
    /// Records that decode but contradict each other (an address owned by an
    /// attachment that does not list it, and so on).
    pub inconsistent: Vec<String>,
    /// Records checked.
    pub records: u64,
    pub stats: JournalStats,
    pub torn_tails: Vec<TornTail>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.inconsistent.is_empty()
    }
}

struct WalState {
    file: Option<Arc<File>>,
    file_path: PathBuf,
    file_len: u64,
    /// Length of the current segment that the last successful sync covered.
    synced_len: u64,
    /// The current segment's salt, repeated in each of its frames.
    salt: u64,
    next_seq: u64,
    written_seq: u64,
    synced_seq: u64,
    syncing: bool,
    pending: Vec<(u64, Vec<WalOpV1>)>,
    poisoned: Option<String>,
    bytes_since_checkpoint: u64,
    checkpoint_requested: bool,
    intent_hwm_written: u64,
    /// Frames the previous sync covered: a hint that others commit too.
    last_group: usize,
}

/// Operations that are durable in the WAL but not yet in sled: per tree,
/// key -> value, where `None` is a deletion that must hide sled's value.
#[derive(Default)]
struct Mem([BTreeMap<Vec<u8>, Option<Vec<u8>>>; 6]);

/// The memtable being filled, and the one a checkpoint is writing to sled.
/// Newer wins: `active` over `frozen` over sled.
struct Tables {
    active: Mem,
    frozen: Option<Arc<Mem>>,
}

enum Msg {
    Checkpoint,
    Stop,
}

struct Inner {
    dir: PathBuf,
    wal_dir: PathBuf,
    sled_dir: PathBuf,
    db: sled::Db,
    trees: Vec<sled::Tree>,
    tables: RwLock<Tables>,
    state: Mutex<WalState>,
    cv: Condvar,
    opts: JournalOptions,
    checkpoint_lock: Mutex<()>,
    checkpoint_seq: AtomicU64,
    syncs: AtomicU64,
    commits: AtomicU64,
    /// Mirrors `WalState::poisoned.is_some()`, readable without the lock.
    poisoned: AtomicBool,
    /// Test hook: successful WAL syncs left before an injected failure, or
    /// `DISARMED`.
    sync_failure_after: AtomicU64,
    /// Set by `abandon`: the checkpointer must not run a queued checkpoint.
    crashed: AtomicBool,
    intent_next: AtomicU64,
    tx: Mutex<Option<mpsc::Sender<Msg>>>,
    /// Wakes the syncer thread for a deferred commit.
    sync_tx: Mutex<Option<mpsc::Sender<()>>>,
    /// The newest seq written by [`Journal::commit_deferred`] (0: none).
    deferred_seq: AtomicU64,
    /// Mirrors `WalState::synced_seq`, readable without the lock.
    synced_pub: AtomicU64,
    _lock: File,
}

/// The node's write-ahead journal. Share it with `Arc<Journal>`; every method
/// takes `&self` and is safe to call from many threads.
pub struct Journal {
    inner: Arc<Inner>,
    checkpointer: Option<JoinHandle<()>>,
    syncer: Option<JoinHandle<()>>,
    report: OpenReport,
    abandoned: AtomicBool,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.inner.dir)
            .field("read_only", &self.inner.opts.read_only)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn corrupt(tree: Tree, key: &[u8], e: DecodeError) -> JournalError {
    JournalError::Corrupt {
        key: codec::show_key(tree, key),
        reason: e.to_string(),
    }
}

fn flock_exclusive(dir: &Path) -> Result<File> {
    let path = dir.join("LOCK");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(durable::FILE_MODE)
        .open(&path)
        .map_err(|e| JournalError::io("open lock file", &path, e))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(JournalError::Locked {
                dir: dir.to_path_buf(),
            });
        }
        return Err(JournalError::io("flock", &path, err));
    }
    Ok(f)
}

fn open_sled(dir: &Path, sled_dir: &Path, cache: u64) -> Result<sled::Db> {
    let cfg = sled::Config::new()
        .path(sled_dir)
        .cache_capacity(cache)
        .flush_every_ms(None)
        .mode(sled::Mode::LowSpace);
    // We hold the journal's own flock, so a sled lock held by someone else
    // can only be this process's previous handle whose sled threads are
    // still winding down: wait for them, boundedly.
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    loop {
        // sled 0.34 can panic on damaged files instead of returning an error.
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cfg.open()));
        match res {
            Ok(Ok(db)) => return Ok(db),
            Ok(Err(sled::Error::Io(e)))
                if (e.kind() == std::io::ErrorKind::WouldBlock
                    || e.to_string().contains("could not acquire lock"))
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Ok(Err(e)) => {
                return Err(JournalError::Open {
                    dir: dir.to_path_buf(),
                    reason: format!("sled: {e}"),
                })
            }
            Err(_) => {
                return Err(JournalError::Open {
                    dir: dir.to_path_buf(),
                    reason: "sled panicked while opening its files".into(),
                })
            }
        }
    }
}

fn read_checkpoint(dir: &Path) -> Result<Option<codec::CheckpointV1>> {
    let path = dir.join(CHECKPOINT_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(JournalError::io("read", &path, e)),
    };
    match codec::decode_checkpoint(&bytes) {
        Ok(c) => {
            if c.format_version < u32::from(OLDEST_FORMAT_VERSION) {
                return Err(JournalError::OlderFormat {
                    dir: dir.to_path_buf(),
                    found: c.format_version,
                    oldest: u32::from(OLDEST_FORMAT_VERSION),
                });
            }
            Ok(Some(c))
        }
        Err(DecodeError::NewerVersion(v)) => Err(JournalError::NewerFormat {
            dir: dir.to_path_buf(),
            found: u32::from(v),
            supported: u32::from(FORMAT_VERSION),
        }),
        Err(DecodeError::OlderVersion(v)) => Err(JournalError::OlderFormat {
            dir: dir.to_path_buf(),
            found: u32::from(v),
            oldest: u32::from(OLDEST_FORMAT_VERSION),
        }),
        Err(e) => Err(JournalError::Corrupt {
            key: CHECKPOINT_FILE.into(),
            reason: e.to_string(),
        }),
    }
}

/// Atomically replaces the CHECKPOINT file: temp file, fsync, rename, fsync dir.
fn write_checkpoint(dir: &Path, seq: u64) -> Result<()> {
    let tmp = dir.join("CHECKPOINT.tmp");
    let path = dir.join(CHECKPOINT_FILE);
    {
        let f = durable::create_private_file(&tmp, "create")?;
        wal::write_all_at(&f, &codec::encode_checkpoint(seq), 0)
            .map_err(|e| JournalError::io("write", &tmp, e))?;
        f.sync_all()
            .map_err(|e| JournalError::io("fsync", &tmp, e))?;
    }
    fs::rename(&tmp, &path).map_err(|e| JournalError::io("rename", &path, e))?;
    durable::sync_dir(dir)
}

/// The failure armed by [`FAIL_SYNC_AFTER_ENV`]: only builds with the
/// `failpoints` feature read it; others say that they ignore it.
fn sync_failure_from_env() -> u64 {
    let Some(v) = std::env::var_os(FAIL_SYNC_AFTER_ENV) else {
        return DISARMED;
    };
    if !cfg!(feature = "failpoints") {
        tracing::warn!(
            "{FAIL_SYNC_AFTER_ENV} is set but ignored: this build has no journal failpoints"
        );
        return DISARMED;
    }
    match v.to_str().and_then(|s| s.trim().parse::<u64>().ok()) {
        Some(n) => {
            tracing::warn!(
                "{FAIL_SYNC_AFTER_ENV}={n}: WAL fdatasync {} after this open will fail (test failpoint)",
                n.saturating_add(1)
            );
            n.min(DISARMED - 1)
        }
        None => {
            tracing::warn!(value = ?v, "{FAIL_SYNC_AFTER_ENV} is not a number; ignored");
            DISARMED
        }
    }
}

/// Seconds since the epoch, for `created_unix` fields.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Journal {
    /// Opens (or creates) the journal in `dir` with default options.
    pub fn open(dir: impl AsRef<Path>) -> Result<Journal> {
        Journal::open_with(dir, JournalOptions::default())
    }

    /// Opens (or, unless read-only, creates) the journal in `dir`: takes the
    /// lock, checks the format version, opens sled, replays the WAL after the
    /// last checkpoint, cuts off a torn tail, and starts a fresh segment.
    pub fn open_with(dir: impl AsRef<Path>, opts: JournalOptions) -> Result<Journal> {
        let started = Instant::now();
        let dir = dir.as_ref().to_path_buf();
        if opts.read_only {
            if !dir.join(CHECKPOINT_FILE).exists() && !dir.join("sled").exists() {
                return Err(JournalError::NotFound { dir });
            }
        } else {
            durable::create_private_dir(&dir)?;
        }
        let lock_file = flock_exclusive(&dir)?;
        let checkpoint = read_checkpoint(&dir)?;
        let wal_dir = dir.join("wal");
        let sled_dir = dir.join("sled");
        if !opts.read_only {
            durable::create_private_dir(&wal_dir)?;
            // Before sled creates it with the process umask.
            durable::create_private_dir(&sled_dir)?;
        }
        let segments = if wal_dir.exists() {
            wal::list_segments(&wal_dir)?
        } else {
            Vec::new()
        };
        if !opts.read_only {
            durable::remove_unfinished_sled_snapshots(&sled_dir)?;
        }
        let db = open_sled(&dir, &sled_dir, opts.cache_bytes)?;
        let mut trees = Vec::with_capacity(Tree::ALL.len());
        for t in Tree::ALL {
            trees.push(
                db.open_tree(t.name())
                    .map_err(|e| JournalError::sled("open tree", e))?,
            );
        }
        let mut report = OpenReport::default();
        let checkpoint_format = checkpoint.map(|c| c.format_version);
        let checkpoint_seq = match checkpoint {
            Some(c) => c.seq,
            None => {
                let empty = trees.iter().all(|t| t.is_empty()) && segments.is_empty();
                if !empty {
                    return Err(JournalError::Corrupt {
                        key: CHECKPOINT_FILE.into(),
                        reason: "missing, but the journal holds data".into(),
                    });
                }
                if opts.read_only {
                    return Err(JournalError::NotFound { dir });
                }
                write_checkpoint(&dir, 0)?;
                durable::sync_tree(&sled_dir)?;
                report.created = true;
                0
            }
        };
        report.checkpoint_seq = checkpoint_seq;
        if !opts.read_only {
            // A journal from a previous build, or files sled just created.
            durable::restrict_tree(&dir)?;
        }

        // Replay the WAL after the checkpoint.
        let mut expected = checkpoint_seq + 1;
        let mut mem = Mem::default();
        let mut covered = Vec::new();
        for (i, seg) in segments.iter().enumerate() {
            let newest = i + 1 == segments.len();
            let scan = wal::scan_segment(&seg.path)?;
            if let Some(bad) = &scan.bad {
                let key = format!("{}@{}", seg.path.display(), bad.offset);
                // The first seq at or after the damage.
                let damaged_seq = scan.batches.last().map_or(seg.first_seq, |b| b.seq + 1);
                if let Some(p) = bad.proof {
                    // Seqs up to the checkpoint are in sled already: damage
                    // to their frames loses nothing.
                    if p.synced_seq >= damaged_seq.max(checkpoint_seq + 1) {
                        return Err(JournalError::AcknowledgedDamage {
                            segment: seg.path.clone(),
                            offset: bad.offset,
                            seq: damaged_seq,
                            reason: bad.reason.clone(),
                            proof_seq: p.seq,
                            proof_offset: p.offset,
                            synced_seq: p.synced_seq,
                        });
                    }
                }
                if scan.header.is_none() && bad.later_valid_frames > 0 {
                    // The header is synced before any frame is appended, so
                    // a damaged header with frames after it is not a torn
                    // write.
                    return Err(JournalError::Corrupt {
                        key,
                        reason: format!(
                            "{}, but {} valid frames follow it",
                            bad.reason, bad.later_valid_frames
                        ),
                    });
                }
                if !newest
                    || opts.recovery == RecoveryMode::Strict
                    || bad.later_valid_frames > MAX_UNSYNCED_FRAMES
                {
                    return Err(JournalError::Corrupt {
                        key,
                        reason: format!(
                            "{} ({} valid frames follow)",
                            bad.reason, bad.later_valid_frames
                        ),
                    });
                }
                report.torn_tails.push(TornTail {
                    segment: seg.path.clone(),
                    offset: bad.offset,
                    dropped_bytes: scan.file_len - scan.valid_len,
                    reason: bad.reason.clone(),
                    later_valid_frames: bad.later_valid_frames,
                });
            }
            if let Some(h) = &scan.header {
                if h.first_seq != seg.first_seq {
                    return Err(JournalError::Corrupt {
                        key: seg.path.display().to_string(),
                        reason: format!(
                            "segment header says first seq {}, file name says {}",
                            h.first_seq, seg.first_seq
                        ),
                    });
                }
            }
            let mut last_in_segment = seg.first_seq.saturating_sub(1);
            for b in scan.batches {
                last_in_segment = b.seq;
                if b.seq < expected {
                    continue;
                }
                if b.seq != expected {
                    return Err(JournalError::Corrupt {
                        key: format!("{}", seg.path.display()),
                        reason: format!("WAL gap: expected seq {expected}, found {}", b.seq),
                    });
                }
                for op in b.ops {
                    let Some(t) = Tree::from_id(op.tree) else {
                        return Err(JournalError::Corrupt {
                            key: format!("{} seq {}", seg.path.display(), b.seq),
                            reason: format!("unknown tree id {}", op.tree),
                        });
                    };
                    mem.0[t.index()].insert(op.key, op.value);
                }
                report.replayed_batches += 1;
                expected += 1;
            }
            if last_in_segment <= checkpoint_seq && !newest {
                covered.push(seg.path.clone());
            }
            if !opts.read_only && scan.bad.is_some() {
                if scan.valid_len == 0 || scan.header.is_none() {
                    fs::remove_file(&seg.path)
                        .map_err(|e| JournalError::io("remove torn segment", &seg.path, e))?;
                    durable::sync_dir(&wal_dir)?;
                } else {
                    wal::truncate_segment(&seg.path, scan.valid_len)?;
                }
            }
        }
        let last_seq = expected - 1;
        report.last_seq = last_seq;

        let hwm_bytes = match mem.0[Tree::Meta.index()].get(META_INTENT_HWM) {
            Some(v) => v.clone().map(sled::IVec::from),
            None => trees[Tree::Meta.index()]
                .get(META_INTENT_HWM)
                .map_err(|e| JournalError::sled("read", e))?,
        };
        let intent_hwm = match hwm_bytes {
            Some(v) => {
                codec::decode_counter(&v).map_err(|e| corrupt(Tree::Meta, META_INTENT_HWM, e))?
            }
            None => 0,
        };

        let mut state = WalState {
            file: None,
            file_path: PathBuf::new(),
            file_len: 0,
            synced_len: 0,
            salt: 0,
            next_seq: last_seq + 1,
            written_seq: last_seq,
            synced_seq: last_seq,
            syncing: false,
            pending: Vec::new(),
            poisoned: None,
            bytes_since_checkpoint: 0,
            checkpoint_requested: false,
            intent_hwm_written: intent_hwm,
            last_group: 0,
        };
        if !opts.read_only {
            // Mark the journal as this format before writing anything in it,
            // so an older coil refuses it (`NewerFormat`) instead of taking
            // format 2 frames for damage.
            if checkpoint_format.is_some_and(|v| v < u32::from(FORMAT_VERSION)) {
                write_checkpoint(&dir, checkpoint_seq)?;
            }
            for p in &covered {
                fs::remove_file(p).map_err(|e| JournalError::io("remove segment", p, e))?;
                report.removed_segments += 1;
            }
            let path = wal::segment_path(&wal_dir, last_seq + 1);
            // A previous open may have created this very segment and died
            // before writing to it; it holds only a header, so recreate it.
            let seg = wal::create_segment(&wal_dir, last_seq + 1)?;
            state.file = Some(Arc::new(seg.file));
            state.file_path = path;
            state.file_len = seg.len;
            state.synced_len = seg.len;
            state.salt = seg.salt;
            if report.replayed_batches > 0 {
                state.bytes_since_checkpoint = opts.checkpoint_bytes;
            }
        }

        let (tx, rx) = mpsc::channel();
        let (sync_tx, sync_rx) = mpsc::channel();
        let read_only = opts.read_only;
        let synced_at_open = state.synced_seq;
        let inner = Arc::new(Inner {
            dir,
            wal_dir,
            sled_dir,
            db,
            trees,
            tables: RwLock::new(Tables {
                active: mem,
                frozen: None,
            }),
            state: Mutex::new(state),
            cv: Condvar::new(),
            opts,
            checkpoint_lock: Mutex::new(()),
            checkpoint_seq: AtomicU64::new(checkpoint_seq),
            syncs: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            poisoned: AtomicBool::new(false),
            sync_failure_after: AtomicU64::new(if read_only {
                DISARMED
            } else {
                sync_failure_from_env()
            }),
            crashed: AtomicBool::new(false),
            intent_next: AtomicU64::new(intent_hwm + 1),
            tx: Mutex::new(if read_only { None } else { Some(tx) }),
            sync_tx: Mutex::new(if read_only { None } else { Some(sync_tx) }),
            deferred_seq: AtomicU64::new(0),
            synced_pub: AtomicU64::new(synced_at_open),
            _lock: lock_file,
        });
        let checkpointer = if read_only {
            None
        } else {
            let worker = Arc::clone(&inner);
            let handle = std::thread::Builder::new()
                .name("coil-journal-ckpt".into())
                .spawn(move || checkpointer(worker, rx))
                .map_err(|e| JournalError::io("spawn checkpointer", &inner.dir, e))?;
            Some(handle)
        };
        let syncer = if read_only {
            None
        } else {
            let worker = Arc::clone(&inner);
            let handle = std::thread::Builder::new()
                .name("coil-journal-sync".into())
                .spawn(move || syncer(worker, sync_rx))
                .map_err(|e| JournalError::io("spawn syncer", &inner.dir, e))?;
            Some(handle)
        };
        report.open_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let j = Journal {
            inner,
            checkpointer,
            syncer,
            report,
            abandoned: AtomicBool::new(false),
        };
        if j.report.replayed_batches > 0 && !read_only {
            j.inner.request_checkpoint();
        }
        tracing::debug!(dir = %j.inner.dir.display(), report = ?j.report, "journal opened");
        Ok(j)
    }

    /// What opening found and did.
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// The journal's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// True once a failed WAL write or sync has poisoned the journal: every
    /// commit fails with [`JournalError::Poisoned`] until the process
    /// reopens it. One atomic load, for health checks.
    pub fn is_poisoned(&self) -> bool {
        self.inner.poisoned.load(Ordering::Acquire)
    }

    /// Why the journal is poisoned, if it is.
    pub fn poison_reason(&self) -> Option<String> {
        lock(&self.inner.state).poisoned.clone()
    }

    /// Test hook: makes the next WAL fdatasync fail as if the disk had
    /// returned an error. That commit, and every later one, fails with
    /// [`JournalError::Poisoned`]. The frames that sync would have covered
    /// (and any written after them) are cut from the segment, as the kernel
    /// may drop dirty pages after a failed fsync, so a reopen holds exactly
    /// the commits acknowledged before the failure.
    ///
    /// Other processes (coild under test) arm the same failure with the
    /// environment variable [`FAIL_SYNC_AFTER_ENV`] in builds with this
    /// crate's `failpoints` feature.
    #[doc(hidden)]
    pub fn inject_sync_failure(&self) {
        self.inner.sync_failure_after.store(0, Ordering::Release);
    }

    /// Allocates a fresh intent id. Ids are unique for the journal's life:
    /// the high-water mark is committed with every batch that carries an
    /// intent.
    pub fn next_intent_id(&self) -> u64 {
        self.inner.intent_next.fetch_add(1, Ordering::Relaxed)
    }

    /// Commits `batch`: returns once it is durable on disk and visible to
    /// reads. Concurrent callers share one fdatasync.
    ///
    /// An `Err` means the outcome is unknown (the frame may or may not have
    /// reached the disk), exactly as if the process had crashed at this
    /// point; after a failed sync the journal is poisoned and refuses further
    /// commits until it is reopened.
    pub fn commit(&self, batch: Batch) -> Result<CommitInfo> {
        let (st, seq) = match self.append(batch)? {
            Appended::Nothing(seq) => return Ok(CommitInfo { seq }),
            Appended::Frame(st, seq) => (st, seq),
        };
        self.inner.wait_synced(st, seq)?;
        self.inner.commits.fetch_add(1, Ordering::Relaxed);
        Ok(CommitInfo { seq })
    }

    /// Commits `batch` without waiting for its `fdatasync`: the frame is
    /// written to the WAL (so it survives the process being killed: the
    /// page cache holds it) and a background thread syncs it within
    /// microseconds, or the next commit's group sync covers it. A power cut
    /// before that sync may lose it (and only it and later frames: the WAL
    /// keeps its order). Reads see it: a read first waits for the sync.
    ///
    /// For records whose loss in a power cut recovery handles anyway; the
    /// caller must be able to say why (see docs/ARCHITECTURE.md, "which
    /// record must be durable before the answer"). A failed background
    /// sync poisons the journal like any other.
    pub fn commit_deferred(&self, batch: Batch) -> Result<CommitInfo> {
        let (st, seq) = match self.append(batch)? {
            Appended::Nothing(seq) => return Ok(CommitInfo { seq }),
            Appended::Frame(st, seq) => (st, seq),
        };
        self.inner.deferred_seq.fetch_max(seq, Ordering::AcqRel);
        drop(st);
        self.inner.commits.fetch_add(1, Ordering::Relaxed);
        if let Some(tx) = lock(&self.inner.sync_tx).as_ref() {
            let _ = tx.send(());
        }
        Ok(CommitInfo { seq })
    }

    /// Waits until every deferred commit is durable and applied, so reads
    /// see them.
    fn settle(&self) -> Result<()> {
        let want = self.inner.deferred_seq.load(Ordering::Acquire);
        if want == 0 || self.inner.synced_pub.load(Ordering::Acquire) >= want {
            return Ok(());
        }
        let st = lock(&self.inner.state);
        self.inner.wait_synced(st, want)
    }

    /// Writes `batch`'s frame at the WAL's end; returns with the state lock
    /// held, or `Nothing` when there was nothing to write.
    fn append(&self, batch: Batch) -> Result<Appended<'_>> {
        if let Some(why) = batch.invalid {
            return Err(JournalError::Invalid(why));
        }
        if self.inner.opts.read_only {
            return Err(JournalError::ReadOnly {
                dir: self.inner.dir.clone(),
            });
        }
        let mut ops = batch.ops;
        let inner = &self.inner;
        let mut st = lock(&inner.state);
        if let Some(r) = &st.poisoned {
            return Err(JournalError::Poisoned { reason: r.clone() });
        }
        if batch.max_intent > st.intent_hwm_written {
            st.intent_hwm_written = batch.max_intent;
            ops.push(WalOpV1 {
                tree: Tree::Meta.id(),
                key: META_INTENT_HWM.to_vec(),
                value: Some(codec::encode_counter(batch.max_intent)),
            });
        }
        if ops.is_empty() {
            return Ok(Appended::Nothing(st.written_seq));
        }
        let seq = st.next_seq;
        // `synced_seq` is what a sync has covered before this frame is
        // written: if this frame survives and an earlier one does not,
        // replay knows whether the lost one was acknowledged.
        let frame = wal::encode_batch(seq, st.salt, st.synced_seq, &ops);
        if frame.len() > crate::envelope::MAX_PAYLOAD {
            return Err(JournalError::Invalid(format!(
                "batch of {} operations encodes to {} bytes, over the limit",
                ops.len(),
                frame.len()
            )));
        }
        let Some(file) = st.file.clone() else {
            return Err(JournalError::ReadOnly {
                dir: inner.dir.clone(),
            });
        };
        if let Err(e) = wal::write_all_at(&file, &frame, st.file_len) {
            // Cut the partial frame off so later frames are not written
            // behind garbage; if that fails too, stop accepting commits.
            if let Err(e2) = file.set_len(st.file_len) {
                let why = format!(
                    "write to {} failed ({e}) and truncating it back failed ({e2})",
                    st.file_path.display()
                );
                inner.poison(&mut st, why);
            }
            return Err(JournalError::io("append", st.file_path.clone(), e));
        }
        st.next_seq += 1;
        st.written_seq = seq;
        st.file_len += frame.len() as u64;
        st.bytes_since_checkpoint += frame.len() as u64;
        st.pending.push((seq, ops));
        Ok(Appended::Frame(st, seq))
    }

    /// Runs a checkpoint now: flushes and fsyncs sled, records the covered
    /// sequence number, removes the WAL segments it covers.
    pub fn checkpoint(&self) -> Result<()> {
        if self.inner.opts.read_only {
            return Err(JournalError::ReadOnly {
                dir: self.inner.dir.clone(),
            });
        }
        self.inner.checkpoint()
    }

    /// Closes the journal cleanly (with a final checkpoint).
    pub fn close(mut self) -> Result<()> {
        self.stop_checkpointer();
        if self.inner.opts.read_only {
            return Ok(());
        }
        self.abandoned.store(true, Ordering::Relaxed);
        self.inner.checkpoint()
    }

    /// Drops the journal as a crash would: no final checkpoint, so the next
    /// open replays the WAL. For tests and benchmarks.
    pub fn abandon(mut self) {
        self.abandoned.store(true, Ordering::Relaxed);
        self.inner.crashed.store(true, Ordering::Relaxed);
        self.stop_checkpointer();
    }

    fn stop_checkpointer(&mut self) {
        lock(&self.inner.sync_tx).take();
        if let Some(h) = self.syncer.take() {
            let _ = h.join();
        }
        if let Some(tx) = lock(&self.inner.tx).take() {
            let _ = tx.send(Msg::Stop);
        }
        if let Some(h) = self.checkpointer.take() {
            let _ = h.join();
        }
    }

    /// Figures about the journal's size.
    pub fn stats(&self) -> JournalStats {
        let last_seq = lock(&self.inner.state).written_seq;
        let mut s = JournalStats {
            last_seq,
            checkpoint_seq: self.inner.checkpoint_seq.load(Ordering::Relaxed),
            syncs: self.inner.syncs.load(Ordering::Relaxed),
            commits: self.inner.commits.load(Ordering::Relaxed),
            ..Default::default()
        };
        if let Ok(segs) = wal::list_segments(&self.inner.wal_dir) {
            s.wal_segments = segs.len();
            s.wal_bytes = segs
                .iter()
                .filter_map(|g| fs::metadata(&g.path).ok())
                .map(|m| m.len())
                .sum();
        }
        s
    }

    /// Reads one raw value: memtable first, then sled.
    fn raw_get(&self, t: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.settle()?;
        let tables = self.inner.tables.read().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = tables.active.0[t.index()].get(key) {
            return Ok(v.clone());
        }
        if let Some(f) = &tables.frozen {
            if let Some(v) = f.0[t.index()].get(key) {
                return Ok(v.clone());
            }
        }
        Ok(self.inner.trees[t.index()]
            .get(key)
            .map_err(|e| JournalError::sled("read", e))?
            .map(|v| v.to_vec()))
    }

    /// Reads a key range of a tree, memtable merged over sled, in key order.
    fn raw_range(
        &self,
        t: Tree,
        lo: Bound<Vec<u8>>,
        hi: Bound<Vec<u8>>,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.settle()?;
        let tables = self.inner.tables.read().unwrap_or_else(|e| e.into_inner());
        let mut m: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for kv in self.inner.trees[t.index()].range((lo.clone(), hi.clone())) {
            let (k, v) = kv.map_err(|e| JournalError::sled("scan", e))?;
            m.insert(k.to_vec(), Some(v.to_vec()));
        }
        let layers = tables.frozen.iter().map(|f| &f.0[t.index()]);
        for layer in layers.chain(std::iter::once(&tables.active.0[t.index()])) {
            for (k, v) in layer.range((lo.clone(), hi.clone())) {
                m.insert(k.clone(), v.clone());
            }
        }
        Ok(m.into_iter().filter_map(|(k, v)| Some((k, v?))).collect())
    }

    fn get<T>(
        &self,
        t: Tree,
        key: &[u8],
        dec: fn(&[u8]) -> Result<T, DecodeError>,
    ) -> Result<Option<T>> {
        match self.raw_get(t, key)? {
            Some(v) => dec(&v).map(Some).map_err(|e| corrupt(t, key, e)),
            None => Ok(None),
        }
    }

    fn scan<T>(
        &self,
        t: Tree,
        lo: Bound<Vec<u8>>,
        hi: Bound<Vec<u8>>,
        dec: fn(&[u8], &[u8]) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>> {
        self.raw_range(t, lo, hi)?
            .into_iter()
            .map(|(k, v)| dec(&k, &v).map_err(|e| corrupt(t, &k, e)))
            .collect()
    }

    fn scan_all<T>(
        &self,
        t: Tree,
        dec: fn(&[u8], &[u8]) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>> {
        self.scan(t, Bound::Unbounded, Bound::Unbounded, dec)
    }

    pub fn node_meta(&self) -> Result<Option<NodeMeta>> {
        self.get(Tree::Meta, META_NODE, codec::decode_node_meta)
    }

    pub fn lease(&self, block: IpNet) -> Result<Option<BlockLease>> {
        self.get(Tree::Leases, &codec::net_key(block), codec::decode_lease)
    }

    /// All leases, ordered by block address.
    pub fn leases(&self) -> Result<Vec<BlockLease>> {
        self.scan_all(Tree::Leases, |k, v| {
            let l = codec::decode_lease(v)?;
            check_key(k, &codec::net_key(l.block))?;
            Ok(l)
        })
    }

    pub fn attachment(&self, key: &AttachmentKey) -> Result<Option<Attachment>> {
        self.get(
            Tree::Attachments,
            &codec::attachment_key(key),
            codec::decode_attachment,
        )
    }

    /// All attachments, ordered by (container id, ifname).
    pub fn attachments(&self) -> Result<Vec<Attachment>> {
        self.scan_all(Tree::Attachments, |k, v| {
            let a = codec::decode_attachment(v)?;
            check_key(k, &codec::attachment_key(&a.key))?;
            Ok(a)
        })
    }

    pub fn intent(&self, id: u64) -> Result<Option<Intent>> {
        self.get(Tree::Intents, &id.to_be_bytes(), codec::decode_intent)
    }

    /// All intents, oldest first.
    pub fn intents(&self) -> Result<Vec<Intent>> {
        self.scan_all(Tree::Intents, |k, v| {
            let i = codec::decode_intent(v)?;
            check_key(k, &i.id.to_be_bytes())?;
            Ok(i)
        })
    }

    /// Intents still pending, oldest first: what recovery must settle.
    pub fn pending_intents(&self) -> Result<Vec<Intent>> {
        Ok(self
            .intents()?
            .into_iter()
            .filter(|i| i.state == IntentState::Pending)
            .collect())
    }

    pub fn address(&self, addr: IpAddr) -> Result<Option<AddressEntry>> {
        self.get(
            Tree::Addresses,
            &codec::addr_key(addr),
            codec::decode_address,
        )
    }

    /// Addresses assigned inside `block`, in address order: an O(log n + k)
    /// range scan, which is what the allocator needs to find free room.
    pub fn addresses_in(&self, block: IpNet) -> Result<Vec<(IpAddr, AddressEntry)>> {
        let lo = codec::addr_key(block.network());
        let hi = codec::addr_key(block.broadcast());
        self.scan(
            Tree::Addresses,
            Bound::Included(lo),
            Bound::Included(hi),
            decode_address_kv,
        )
    }

    /// Every assigned address, in address order.
    pub fn addresses(&self) -> Result<Vec<(IpAddr, AddressEntry)>> {
        self.scan_all(Tree::Addresses, decode_address_kv)
    }

    /// One entry of the embedded cluster store.
    pub fn store_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get(Tree::Store, key, codec::decode_store)
    }

    /// Entries of the embedded cluster store with keys in `[lo, hi)` (an
    /// empty `hi` means no upper bound), in key order.
    pub fn store_range(&self, lo: &[u8], hi: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let upper = if hi.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(hi.to_vec())
        };
        self.scan(Tree::Store, Bound::Included(lo.to_vec()), upper, |k, v| {
            Ok((k.to_vec(), codec::decode_store(v)?))
        })
    }

    /// Decodes every record, collecting the ones that fail instead of
    /// stopping at the first.
    pub fn dump(&self) -> Dump {
        let mut d = Dump {
            stats: self.stats(),
            ..Default::default()
        };
        let mut bad = |t: Tree, k: &[u8], e: String| {
            d.corrupt.push(CorruptRecord {
                key: codec::show_key(t, k),
                reason: e,
            })
        };
        for t in Tree::ALL {
            let entries = match self.raw_range(t, Bound::Unbounded, Bound::Unbounded) {
                Ok(e) => e,
                Err(e) => {
                    bad(t, b"", e.to_string());
                    continue;
                }
            };
            for (k, v) in entries {
                let res: Result<(), DecodeError> = (|| {
                    match t {
                        Tree::Meta => match k.as_slice() {
                            META_NODE => d.node = Some(codec::decode_node_meta(&v)?),
                            META_INTENT_HWM => d.intent_hwm = codec::decode_counter(&v)?,
                            _ => return Err(DecodeError::Payload("unknown meta key".into())),
                        },
                        Tree::Leases => {
                            let l = codec::decode_lease(&v)?;
                            check_key(&k, &codec::net_key(l.block))?;
                            d.leases.push(l)
                        }
                        Tree::Attachments => {
                            let a = codec::decode_attachment(&v)?;
                            check_key(&k, &codec::attachment_key(&a.key))?;
                            d.attachments.push(a)
                        }
                        Tree::Intents => {
                            let i = codec::decode_intent(&v)?;
                            check_key(&k, &i.id.to_be_bytes())?;
                            d.intents.push(i)
                        }
                        Tree::Addresses => d.addresses.push(decode_address_kv(&k, &v)?),
                        Tree::Store => {
                            let v = codec::decode_store(&v)?;
                            d.store
                                .push((String::from_utf8_lossy(&k).into_owned(), v.len()))
                        }
                    }
                    Ok(())
                })();
                if let Err(e) = res {
                    bad(t, &k, e.to_string());
                }
            }
        }
        d
    }

    /// Checks every record and the cross-references between them.
    pub fn verify(&self) -> VerifyReport {
        let d = self.dump();
        let mut r = VerifyReport {
            records: (d.leases.len()
                + d.attachments.len()
                + d.intents.len()
                + d.addresses.len()
                + d.store.len()
                + usize::from(d.node.is_some())) as u64,
            stats: d.stats,
            torn_tails: self.report.torn_tails.clone(),
            ..Default::default()
        };
        r.records += d.corrupt.len() as u64;
        r.corrupt = d.corrupt;
        let atts: BTreeMap<&AttachmentKey, &Attachment> =
            d.attachments.iter().map(|a| (&a.key, a)).collect();
        let leases: BTreeMap<IpNet, &BlockLease> = d.leases.iter().map(|l| (l.block, l)).collect();
        for (addr, e) in &d.addresses {
            match atts.get(&e.attachment) {
                None => r.inconsistent.push(format!(
                    "address {addr} is owned by {}, which has no attachment record",
                    e.attachment
                )),
                Some(a) if !a.addresses.iter().any(|x| x.addr == *addr) => {
                    r.inconsistent.push(format!(
                        "address {addr} is owned by {}, whose record does not list it",
                        e.attachment
                    ))
                }
                Some(_) => {}
            }
            if !leases.contains_key(&e.block) {
                r.inconsistent.push(format!(
                    "address {addr} belongs to block {}, which the node does not lease",
                    e.block
                ));
            }
        }
        let owners: BTreeMap<IpAddr, &AddressEntry> =
            d.addresses.iter().map(|(a, e)| (*a, e)).collect();
        for a in &d.attachments {
            for x in &a.addresses {
                match owners.get(&x.addr) {
                    Some(e) if e.attachment == a.key => {}
                    Some(e) => r.inconsistent.push(format!(
                        "attachment {} lists {}, which the address index gives to {}",
                        a.key, x.addr, e.attachment
                    )),
                    None => r.inconsistent.push(format!(
                        "attachment {} lists {}, which is missing from the address index",
                        a.key, x.addr
                    )),
                }
            }
        }
        if let Some(max) = d.intents.iter().map(|i| i.id).max() {
            if max > d.intent_hwm {
                r.inconsistent.push(format!(
                    "intent {max} is above the intent high-water mark {}",
                    d.intent_hwm
                ));
            }
        }
        r
    }
}

fn check_key(stored: &[u8], derived: &[u8]) -> Result<(), DecodeError> {
    if stored != derived {
        return Err(DecodeError::Payload(
            "record does not match the key it is stored under".into(),
        ));
    }
    Ok(())
}

fn decode_address_kv(k: &[u8], v: &[u8]) -> Result<(IpAddr, AddressEntry), DecodeError> {
    let addr = codec::addr_from_key(k)?;
    let e = codec::decode_address(v)?;
    if !e.block.contains(&addr) {
        return Err(DecodeError::Payload(format!(
            "address {addr} outside its block {}",
            e.block
        )));
    }
    Ok((addr, e))
}

/// What [`Journal::append`] did.
enum Appended<'a> {
    Nothing(u64),
    Frame(MutexGuard<'a, WalState>, u64),
}

impl Inner {
    /// Waits (leading a group sync when nobody is) until `seq` is durable
    /// and applied; asks for a checkpoint when the WAL has grown enough.
    fn wait_synced<'a>(&'a self, mut st: MutexGuard<'a, WalState>, seq: u64) -> Result<()> {
        loop {
            if st.synced_seq >= seq {
                let want_checkpoint = st.bytes_since_checkpoint >= self.opts.checkpoint_bytes
                    && !st.checkpoint_requested;
                if want_checkpoint {
                    st.checkpoint_requested = true;
                }
                drop(st);
                if want_checkpoint {
                    self.request_checkpoint();
                }
                return Ok(());
            }
            if let Some(r) = &st.poisoned {
                return Err(JournalError::Poisoned { reason: r.clone() });
            }
            if st.syncing {
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            } else {
                st = self.lead(st);
            }
        }
    }

    /// Becomes the sync leader: fdatasyncs everything written so far, applies
    /// it to sled in WAL order, publishes the new synced sequence number.
    /// Called with the state lock held and `syncing == false`; returns with
    /// the lock held again.
    fn lead<'a>(&'a self, mut st: MutexGuard<'a, WalState>) -> MutexGuard<'a, WalState> {
        st.syncing = true;
        if st.last_group > 1 {
            // Others committed alongside us last time: they are probably
            // about to append again. Let them run (a bounded number of
            // yields) before the sync starts, so one fdatasync covers them
            // too instead of the next one. Asking for one more frame than
            // last time lets the group grow to the real concurrency.
            let want = st.last_group + 1;
            for _ in 0..8 {
                if st.pending.len() >= want {
                    break;
                }
                drop(st);
                std::thread::yield_now();
                st = lock(&self.state);
            }
        }
        st.last_group = st.pending.len();
        let target = st.written_seq;
        let target_len = st.file_len;
        let pending = std::mem::take(&mut st.pending);
        let file = st.file.clone();
        let path = st.file_path.clone();
        drop(st);
        let injected = self.take_injected_sync_failure();
        let res = match &file {
            Some(_) if injected => Err(format!(
                "fdatasync {}: injected failure (test hook)",
                path.display()
            )),
            Some(f) => f
                .sync_data()
                .inspect(|()| {
                    self.syncs.fetch_add(1, Ordering::Relaxed);
                })
                .map_err(|e| format!("fdatasync {}: {e}", path.display()))
                .and_then(|()| self.apply(pending)),
            None => Err("no open segment".to_string()),
        };
        let mut st = lock(&self.state);
        st.syncing = false;
        match res {
            Ok(()) => {
                st.synced_seq = target;
                st.synced_len = target_len;
                self.synced_pub.store(target, Ordering::Release);
            }
            Err(mut why) => {
                if let (true, Some(f)) = (injected, &file) {
                    // Play the kernel's worst case after a failed fsync: the
                    // dirty pages are gone. Every frame past the last good
                    // sync (none acknowledged) disappears, so a reopen
                    // holds exactly the acknowledged commits.
                    if let Err(e) = f.set_len(st.synced_len) {
                        why.push_str(&format!("; dropping the unsynced frames failed: {e}"));
                    }
                    st.file_len = st.synced_len;
                }
                self.poison(&mut st, why);
            }
        }
        self.cv.notify_all();
        st
    }

    /// Refuses every later commit: after a failed write or sync only a
    /// reopen knows what is durable.
    fn poison(&self, st: &mut WalState, why: String) {
        tracing::error!(%why, "journal poisoned");
        st.poisoned = Some(why);
        self.poisoned.store(true, Ordering::Release);
    }

    /// Counts one WAL sync against the armed test failure; true if this one
    /// must fail.
    fn take_injected_sync_failure(&self) -> bool {
        let next = |left: u64| (left != DISARMED && left > 0).then(|| left - 1);
        match self
            .sync_failure_after
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, next)
        {
            Ok(_) => false,
            Err(left) => left == 0,
        }
    }

    /// Applies synced batches to the memtable, in WAL order (only the sync
    /// leader calls this, and leaders take turns).
    fn apply(&self, pending: Vec<(u64, Vec<WalOpV1>)>) -> Result<(), String> {
        let mut tables = self.tables.write().unwrap_or_else(|e| e.into_inner());
        for (seq, ops) in pending {
            for op in ops {
                let Some(t) = Tree::from_id(op.tree) else {
                    return Err(format!("seq {seq}: unknown tree id {}", op.tree));
                };
                tables.active.0[t.index()].insert(op.key, op.value);
            }
        }
        Ok(())
    }

    fn request_checkpoint(&self) {
        if let Some(tx) = lock(&self.tx).as_ref() {
            let _ = tx.send(Msg::Checkpoint);
        }
    }

    fn checkpoint(&self) -> Result<()> {
        let _only_one = lock(&self.checkpoint_lock);
        // 1. Make everything written durable and applied, and start a new
        //    segment, so the old ones hold only seqs <= covered.
        let mut st = lock(&self.state);
        //    Frames appended while a leader's fdatasync runs land in the
        //    current segment too, so loop until, with the lock held, nothing
        //    is written that is not synced: only then does the current
        //    segment end exactly at `covered`.
        loop {
            if let Some(r) = &st.poisoned {
                return Err(JournalError::Poisoned { reason: r.clone() });
            }
            if st.syncing {
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            } else if st.written_seq > st.synced_seq {
                st = self.lead(st);
            } else {
                break;
            }
        }
        let covered = st.synced_seq;
        let header_only =
            st.file.is_some() && wal::segment_path(&self.wal_dir, covered + 1) == st.file_path;
        if !header_only {
            let seg = wal::create_segment(&self.wal_dir, covered + 1)?;
            st.file = Some(Arc::new(seg.file));
            st.file_path = wal::segment_path(&self.wal_dir, covered + 1);
            st.file_len = seg.len;
            st.synced_len = seg.len;
            st.salt = seg.salt;
        }
        st.bytes_since_checkpoint = 0;
        st.checkpoint_requested = false;
        // Freeze the memtable while no leader can apply (we hold the state
        // lock and nobody is syncing): it holds exactly the seqs <= covered
        // that are not yet in sled.
        let frozen = {
            let mut tables = self.tables.write().unwrap_or_else(|e| e.into_inner());
            let frozen = Arc::new(std::mem::take(&mut tables.active));
            tables.frozen = Some(Arc::clone(&frozen));
            frozen
        };
        drop(st);

        let res = self.write_to_sled(&frozen, covered);
        let mut tables = self.tables.write().unwrap_or_else(|e| e.into_inner());
        if res.is_err() {
            // Keep the frozen operations readable: fold them back under the
            // newer ones; the WAL still holds them, so nothing is lost.
            for (i, layer) in frozen.0.iter().enumerate() {
                for (k, v) in layer {
                    tables.active.0[i]
                        .entry(k.clone())
                        .or_insert_with(|| v.clone());
                }
            }
        }
        tables.frozen = None;
        res
    }

    /// Writes a frozen memtable into sled, makes sled durable, and only then
    /// records the checkpoint and removes the WAL segments it covers.
    fn write_to_sled(&self, frozen: &Mem, covered: u64) -> Result<()> {
        for (i, layer) in frozen.0.iter().enumerate() {
            if layer.is_empty() {
                continue;
            }
            let mut b = sled::Batch::default();
            for (k, v) in layer {
                match v {
                    Some(v) => b.insert(k.as_slice(), v.as_slice()),
                    None => b.remove(k.as_slice()),
                }
            }
            self.trees[i]
                .apply_batch(b)
                .map_err(|e| JournalError::sled("checkpoint apply", e))?;
        }
        // 2. Make sled durable: flush (sync_file_range) is not enough, so
        //    fsync every file and directory under it.
        self.db
            .flush()
            .map_err(|e| JournalError::sled("flush", e))?;
        durable::sync_tree(&self.sled_dir)?;
        // sled creates files with the process umask.
        durable::restrict_tree(&self.sled_dir)?;

        // 3. Only now claim the checkpoint, then drop what it covers.
        write_checkpoint(&self.dir, covered)?;
        self.checkpoint_seq.store(covered, Ordering::Relaxed);
        let mut removed = false;
        for seg in wal::list_segments(&self.wal_dir)? {
            if seg.first_seq <= covered {
                fs::remove_file(&seg.path)
                    .map_err(|e| JournalError::io("remove segment", &seg.path, e))?;
                removed = true;
            }
        }
        if removed {
            durable::sync_dir(&self.wal_dir)?;
        }
        Ok(())
    }
}

/// Makes deferred commits durable: one group sync per wake-up, covering
/// every frame written by then.
fn syncer(inner: Arc<Inner>, rx: mpsc::Receiver<()>) {
    while rx.recv().is_ok() {
        while rx.try_recv().is_ok() {}
        if inner.crashed.load(Ordering::Relaxed) {
            break;
        }
        let st = lock(&inner.state);
        let target = st.written_seq;
        if st.poisoned.is_some() {
            break;
        }
        if let Err(e) = inner.wait_synced(st, target) {
            tracing::error!(error = %e, "journal: syncing deferred commits failed");
            break;
        }
    }
}

fn checkpointer(inner: Arc<Inner>, rx: mpsc::Receiver<Msg>) {
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Stop => break,
            Msg::Checkpoint => {
                // Coalesce a burst of requests into one checkpoint.
                let mut stop = false;
                while let Ok(m) = rx.try_recv() {
                    if matches!(m, Msg::Stop) {
                        stop = true;
                    }
                }
                if inner.crashed.load(Ordering::Relaxed) {
                    break;
                }
                if let Err(e) = inner.checkpoint() {
                    tracing::error!(error = %e, "journal checkpoint failed");
                    lock(&inner.state).checkpoint_requested = false;
                }
                if stop {
                    break;
                }
            }
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.stop_checkpointer();
        if !self.abandoned.load(Ordering::Relaxed) && !self.inner.opts.read_only {
            if let Err(e) = self.inner.checkpoint() {
                tracing::warn!(error = %e, "final journal checkpoint failed; the next open replays the WAL");
            }
        }
    }
}
