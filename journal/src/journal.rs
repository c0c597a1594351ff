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

mod checkpoint;
mod commit;
mod inspect;
mod open;
mod read;

use checkpoint::{checkpointer, read_checkpoint, write_checkpoint};
use commit::syncer;
use inspect::{check_key, decode_address_kv};

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
    _lock: open::LockFile,
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

    /// Makes every id [`Journal::next_intent_id`] hands out from now on
    /// greater than `id`: for a writer that numbers intents itself (coild's
    /// node machine), before another writer (recovery) takes ids here.
    pub fn reserve_intent_ids_through(&self, id: u64) {
        self.inner
            .intent_next
            .fetch_max(id.saturating_add(1), Ordering::Relaxed);
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
}

impl Inner {}

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
