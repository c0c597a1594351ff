//! DEL and GC: release an attachment, doom its veth before answering, and delete doomed veths in batches (one RCU grace period for many).

use super::*;

/// DEL's kernel teardown, batched: each released attachment's veth is
/// doomed before DEL answers (renamed out of the pod's way, moved to a link group),
/// and the group is deleted in one request when requests pause, when 128
/// are waiting or after a second, whichever comes first. A veth deletion
/// costs the kernel an RCU grace period under the rtnl lock (~20 ms, every
/// ADD's netlink calls wait for it); one batch deletion costs about the
/// same as one. Addresses stay reserved until their veth is gone, and a
/// crash leaves Releasing attachments with pending Unwire intents, which
/// recovery finishes one by one.
pub(super) const TEARDOWN_MAX: usize = 128;
pub(super) const TEARDOWN_MAX_AGE: Duration = Duration::from_secs(1);
pub(super) const TEARDOWN_QUIET: Duration = Duration::from_millis(15);

impl<B: Backend, K: KernelOps> Daemon<B, K> {
    /// Releases one attachment: the intent and the Releasing state are made
    /// durable first; the kernel teardown and the removal of the records
    /// follow, in the background unless `wait`. The addresses stay taken
    /// until the veth is gone, so none is handed out while its kernel state
    /// may still exist. Deleting a veth costs the kernel ~20 ms (an RCU
    /// grace period); a DEL need not wait for it.
    pub(super) async fn release(self: &Arc<Self>, key: &AttachmentKey, wait: bool) -> DResult<()> {
        let Some(a) = self.lock().attachment(key).cloned() else {
            return Ok(());
        };
        if a.state == AttachmentState::Releasing {
            // Already being released (a repeated DEL): nothing more to do.
            return Ok(());
        }
        let id = self.journal.next_intent_id();
        let releasing = Attachment {
            state: AttachmentState::Releasing,
            ..a.clone()
        };
        let mut b = Batch::new();
        b.put_intent(&Intent {
            id,
            op: IntentOp::Unwire { key: key.clone() },
            state: IntentState::Pending,
            created_unix: coil::journal::now_unix(),
        })
        .put_attachment(&releasing);
        self.commit(b).await?;
        if coil::planted::on(coil::planted::Bug::ReuseWhileTearingDown) {
            // Planted (tests only): the addresses look free while the veth
            // still holds them.
            let mut st = self.lock();
            st.remove_attachment(key);
            st.insert_attachment(Attachment {
                addresses: Vec::new(),
                ..releasing
            });
        } else {
            self.lock().insert_attachment(releasing);
        }
        coil::failpoint::hit("del.releasing");
        if wait {
            return self.finish_release(&a, id).await;
        }
        // Doom the veth before answering (its pod end leaves the pod's way:
        // a new ADD may reuse the ifname at once); its deletion is batched.
        let doomed = deadline(
            format!("dooming the veth of {}", a.key),
            self.kernel.doom(&a.host_veth, &a.netns, &a.key.ifname),
        )
        .await;
        match doomed {
            Ok(_) => {
                if let Err(
                    mpsc::error::TrySendError::Full((a, id))
                    | mpsc::error::TrySendError::Closed((a, id)),
                ) = self.teardown.try_send((a, id))
                {
                    self.finish_release_later(a, id);
                }
            }
            Err(e) => {
                tracing::warn!(attachment = %a.key, "dooming its veth: {e}; deleting it now");
                self.finish_release_later(a, id);
            }
        }
        Ok(())
    }

    /// Finishes one release in the background, retried with backoff (the
    /// unbatched path: the teardown queue is full, or dooming failed).
    pub(super) fn finish_release_later(self: &Arc<Self>, a: Attachment, id: u64) {
        let d = self.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            for attempt in 1..=10 {
                match d.finish_release(&a, id).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(attachment = %a.key, attempt, "releasing: {e}");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                }
            }
            tracing::error!(attachment = %a.key, "release keeps failing; the next start or resync retries it");
        });
    }

    /// Has no request been in flight for `quiet`?
    pub(super) fn idle_for(&self, quiet: Duration) -> bool {
        if self.inflight.load(Ordering::Relaxed) > 0 {
            return false;
        }
        let last = self.last_request_ms.load(Ordering::Relaxed);
        let now = self.epoch.elapsed().as_millis() as u64;
        now.saturating_sub(last) >= quiet.as_millis() as u64
    }

    /// Deletes the doomed veths in one request, then drops their records
    /// in one journal batch; their addresses are free only then. Holds the
    /// request gate (shared), so recovery never interleaves.
    pub(super) async fn flush_doomed(self: &Arc<Self>, doomed: Vec<(Attachment, u64)>) {
        let _g = self.gate.read().await;
        // Recovery may have settled some meanwhile: only what is still
        // ours and still Releasing.
        let live: Vec<(Attachment, u64)> = {
            let st = self.lock();
            doomed
                .into_iter()
                .filter(|(a, _)| {
                    st.attachment(&a.key).is_some_and(|x| {
                        x.state == AttachmentState::Releasing && x.addresses == a.addresses
                    })
                })
                .collect()
        };
        if let Err(e) = deadline("deleting doomed veths", self.kernel.delete_doomed()).await {
            tracing::warn!(
                count = live.len(),
                "batched veth teardown: {e}; one by one instead"
            );
            for (a, id) in live {
                self.finish_release_later(a, id);
            }
            return;
        }
        coil::failpoint::hit("del.unwired");
        let mut b = Batch::new();
        for (a, id) in &live {
            b.delete_attachment(&a.key).delete_intent(*id);
            for x in &a.addresses {
                b.delete_address(x.addr);
            }
        }
        if let Err(e) = self.commit(b).await {
            // The veths are gone; the records stay Releasing with their
            // intents, and the next resync drops them.
            tracing::warn!("recording batched teardown: {e}");
            return;
        }
        let mut st = self.lock();
        for (a, _) in &live {
            st.remove_attachment(&a.key);
        }
        drop(st);
        for (a, _) in &live {
            for x in &a.addresses {
                self.mirror(Mirror::Delete(self.record(a, x)));
            }
        }
    }

    pub(super) async fn finish_release(&self, a: &Attachment, intent: u64) -> DResult<()> {
        deadline(
            format!("removing the veth {} of {}", a.host_veth, a.key),
            self.kernel.unwire(&a.host_veth),
        )
        .await?;
        coil::failpoint::hit("del.unwired");
        let mut b = Batch::new();
        b.delete_attachment(&a.key).delete_intent(intent);
        for x in &a.addresses {
            b.delete_address(x.addr);
        }
        self.commit(b).await?;
        self.lock().remove_attachment(&a.key);
        for x in &a.addresses {
            self.mirror(Mirror::Delete(self.record(a, x)));
        }
        Ok(())
    }

    pub(super) async fn del(self: &Arc<Self>, req: &Request) -> DResult<()> {
        let key = request_key(req);
        // The record's own key: a format-1 attachment keeps its key.
        let found = self.lock().lookup(&key).map(|a| a.key.clone());
        match found {
            Some(k) => self.release(&k, false).await,
            None => Ok(()),
        }
    }

    /// GC of one network: releases that network's attachments the runtime
    /// no longer lists. Other networks' attachments, and format-1 ones
    /// whose network is unknown, are never touched (recovery releases those
    /// once their netns is gone). Without the list, nothing is released.
    pub(super) async fn gc(self: &Arc<Self>, req: &Request) -> DResult<()> {
        let network = req.conf.name.as_str();
        let Some(list) = &req.conf.valid_attachments else {
            return Err(DaemonError::Config(format!(
                "GC of network {network:?} needs cni.dev/valid-attachments; nothing was released"
            )));
        };
        let valid: BTreeSet<AttachmentKey> = list
            .iter()
            .map(|v| AttachmentKey::new(network, &v.container_id, &v.ifname))
            .collect();
        let stale: Vec<AttachmentKey> = self
            .lock()
            .attachments()
            .filter(|a| a.key.network == network && !valid.contains(&a.key))
            .map(|a| a.key.clone())
            .collect();
        let mut errors = Vec::new();
        for k in &stale {
            if let Err(e) = self.release(k, true).await {
                errors.push(format!("{k}: {e}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(DaemonError::Internal(format!(
                "GC released {} of {} stale attachment(s); failed: {}",
                stale.len() - errors.len(),
                stale.len(),
                errors.join("; ")
            )))
        }
    }
}

pub(super) async fn teardown_task<B: Backend, K: KernelOps>(
    d: Arc<Daemon<B, K>>,
    rx: mpsc::Receiver<(Attachment, u64)>,
) {
    let dd = d.clone();
    in_batches(&d, rx, move |doomed| {
        let d = dd.clone();
        async move { d.flush_doomed(doomed).await }
    })
    .await
}

/// Hands what `rx` brings to `flush` in batches: when requests pause (none
/// for [`TEARDOWN_QUIET`]), when [`TEARDOWN_MAX`] wait, or when the oldest
/// has waited [`TEARDOWN_MAX_AGE`]. Used by both engines' veth teardown,
/// so that one kernel request (one RCU grace period) covers many veths
/// and no ADD waits behind it.
pub(super) async fn in_batches<B, K, T, F, Fut>(
    d: &Daemon<B, K>,
    mut rx: mpsc::Receiver<T>,
    mut flush: F,
) where
    B: Backend,
    K: KernelOps,
    F: FnMut(Vec<T>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut batch: Vec<T> = Vec::new();
    let mut oldest = Instant::now();
    loop {
        let wait = if batch.is_empty() {
            Duration::from_secs(3600)
        } else {
            Duration::from_millis(5)
        };
        tokio::select! {
            m = rx.recv() => match m {
                Some(x) => {
                    if batch.is_empty() {
                        oldest = Instant::now();
                    }
                    batch.push(x);
                }
                None => return,
            },
            _ = tokio::time::sleep(wait) => {}
        }
        if !batch.is_empty()
            && (batch.len() >= TEARDOWN_MAX
                || oldest.elapsed() >= TEARDOWN_MAX_AGE
                || d.idle_for(TEARDOWN_QUIET))
        {
            flush(std::mem::take(&mut batch)).await;
        }
    }
}
