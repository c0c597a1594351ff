//! Commits: a frame appended to the WAL, one shared fdatasync per group (the leader syncs for everyone who appended before it started), then the memtable; deferred commits synced by the syncer thread.

use super::*;

/// What [`Journal::append`] did.
pub(super) enum Appended<'a> {
    Nothing(u64),
    Frame(MutexGuard<'a, WalState>, u64),
}

/// Makes deferred commits durable: one group sync per wake-up, covering
/// every frame written by then.
pub(super) fn syncer(inner: Arc<Inner>, rx: mpsc::Receiver<()>) {
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

impl Journal {
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
    pub(super) fn settle(&self) -> Result<()> {
        let want = self.inner.deferred_seq.load(Ordering::Acquire);
        if want == 0 || self.inner.synced_pub.load(Ordering::Acquire) >= want {
            return Ok(());
        }
        let st = lock(&self.inner.state);
        self.inner.wait_synced(st, want)
    }

    /// Writes `batch`'s frame at the WAL's end; returns with the state lock
    /// held, or `Nothing` when there was nothing to write.
    pub(super) fn append(&self, batch: Batch) -> Result<Appended<'_>> {
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
}

impl Inner {
    /// Waits (leading a group sync when nobody is) until `seq` is durable
    /// and applied; asks for a checkpoint when the WAL has grown enough.
    pub(super) fn wait_synced<'a>(
        &'a self,
        mut st: MutexGuard<'a, WalState>,
        seq: u64,
    ) -> Result<()> {
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
    pub(super) fn lead<'a>(&'a self, mut st: MutexGuard<'a, WalState>) -> MutexGuard<'a, WalState> {
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
    pub(super) fn poison(&self, st: &mut WalState, why: String) {
        tracing::error!(%why, "journal poisoned");
        st.poisoned = Some(why);
        self.poisoned.store(true, Ordering::Release);
    }

    /// Counts one WAL sync against the armed test failure; true if this one
    /// must fail.
    pub(super) fn take_injected_sync_failure(&self) -> bool {
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
    pub(super) fn apply(&self, pending: Vec<(u64, Vec<WalOpV1>)>) -> Result<(), String> {
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
}
