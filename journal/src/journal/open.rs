//! Opening a journal: the lock, sled, the checkpoint, and the replay of the WAL after it into the memtable (with the recovery modes for a damaged tail).

use super::*;

/// The journal's LOCK file, held for as long as the journal is open, and
/// unlocked explicitly when dropped. A lock left to the close of the
/// descriptor would outlive it: a child this process forks meanwhile
/// (`std::process::Command`) holds a copy of the descriptor until its
/// exec, and an flock belongs to the open file, so the copy kept the
/// journal "locked by another process" for that moment. LOCK_UN releases
/// it for every copy.
#[derive(Debug)]
pub(super) struct LockFile(File);

impl Drop for LockFile {
    fn drop(&mut self) {
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

pub(super) fn flock_exclusive(dir: &Path) -> Result<LockFile> {
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
    Ok(LockFile(f))
}

pub(super) fn open_sled(dir: &Path, sled_dir: &Path, cache: u64) -> Result<sled::Db> {
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
}
