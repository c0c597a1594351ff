//! Checkpoints: freeze the memtable, write it to sled in one batch per tree, flush and fsync sled, record the covered seq, delete the covered WAL segments.

use super::*;

pub(super) fn read_checkpoint(dir: &Path) -> Result<Option<codec::CheckpointV1>> {
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
pub(super) fn write_checkpoint(dir: &Path, seq: u64) -> Result<()> {
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

pub(super) fn checkpointer(inner: Arc<Inner>, rx: mpsc::Receiver<Msg>) {
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

impl Journal {
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
}

impl Inner {
    pub(super) fn request_checkpoint(&self) {
        if let Some(tx) = lock(&self.tx).as_ref() {
            let _ = tx.send(Msg::Checkpoint);
        }
    }

    pub(super) fn checkpoint(&self) -> Result<()> {
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
    pub(super) fn write_to_sled(&self, frozen: &Mem, covered: u64) -> Result<()> {
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
