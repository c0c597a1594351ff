//! The address index: coild's asynchronous mirror of its attachments in the store, and its repair.

use super::*;

impl<B: Backend, K: KernelOps> Daemon<B, K> {
    /// Brings the address index in line with the journal for this node's
    /// leased blocks: entries naming this node that no wired attachment
    /// holds are deleted, wired attachments missing from it are put. The
    /// mirror queue lives in memory, so a kill -9 during a store outage
    /// loses its pending updates; this repairs them. Returns the repairs
    /// made; stops quietly while the store does not answer.
    pub(super) async fn reconcile_index(&self) -> usize {
        let me = self.cfg.node_name.clone();
        let (blocks, wired, busy) = {
            let st = self.lock();
            let blocks: Vec<IpNet> = st
                .blocks()
                .filter(|b| b.lease.state == LeaseState::Leased)
                .map(|b| b.lease.block)
                .collect();
            let mut wired: HashMap<std::net::IpAddr, AddressRecord> = HashMap::new();
            let mut busy: BTreeSet<std::net::IpAddr> = BTreeSet::new();
            for a in st.attachments() {
                for x in &a.addresses {
                    if a.state == AttachmentState::Wired {
                        wired.insert(x.addr, self.record(a, x));
                    } else {
                        busy.insert(x.addr);
                    }
                }
            }
            (blocks, wired, busy)
        };
        let mut repairs = 0;
        for b in blocks {
            let Ok(entries) = self.store.addresses_in(&b).await else {
                return repairs;
            };
            for e in entries.iter().filter(|e| e.node == me) {
                let held = wired
                    .get(&e.address)
                    .is_some_and(|w| w.container_id == e.container_id && w.ifname == e.ifname);
                if !held && !busy.contains(&e.address) {
                    if let Ok(true) = self.store.delete_address(e).await {
                        repairs += 1;
                    }
                }
            }
            for (addr, rec) in wired.iter().filter(|(a, _)| b.contains(*a)) {
                let present = entries.iter().any(|e| {
                    e.address == *addr
                        && e.node == me
                        && e.container_id == rec.container_id
                        && e.ifname == rec.ifname
                });
                if !present && self.store.put_address(rec).await.is_ok() {
                    repairs += 1;
                }
            }
        }
        if repairs > 0 {
            tracing::info!(repairs, "address index brought in line with the journal");
            self.index_repairs
                .fetch_add(repairs as u64, Ordering::Relaxed);
        }
        repairs
    }

    /// Queues an address index update without ever waiting: the index is
    /// a mirror, and a full queue (a long store outage under churn) drops
    /// the update, counted (stats `index_updates_dropped`), rather than
    /// hold a request or grow without bound. The index only informs
    /// coilctl and the controller; allocation never reads it, so a dropped
    /// update leaves a stale hint, never a second owner.
    pub(super) fn mirror(&self, m: Mirror) {
        if self.mirror.try_send(m).is_err() {
            let n = self.mirror_dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_multiple_of(1000) {
                tracing::warn!(
                    dropped = n + 1,
                    "address index queue full; dropping updates"
                );
            }
        }
    }

    pub(super) fn record(&self, a: &Attachment, x: &AssignedAddress) -> AddressRecord {
        AddressRecord {
            address: x.addr,
            pool: a.pool.clone(),
            block: x.block,
            node: self.cfg.node_name.clone(),
            network: a.key.network.clone(),
            container_id: a.key.container_id.clone(),
            ifname: a.key.ifname.clone(),
            pod_namespace: a.pod_namespace.clone(),
            pod_name: a.pod_name.clone(),
        }
    }
}

/// Applies address index updates in the background. While the store does
/// not answer they queue (bounded) and are retried in order, so the index
/// catches up when the store is back.
pub(super) async fn mirror_task<B: Backend, K: KernelOps>(
    d: Arc<Daemon<B, K>>,
    mut rx: mpsc::Receiver<Mirror>,
) {
    const MAX_PENDING: usize = 100_000;
    let mut pending: std::collections::VecDeque<Mirror> = std::collections::VecDeque::new();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(m) => {
                    if pending.len() >= MAX_PENDING {
                        pending.pop_front();
                        tracing::warn!("address index backlog full; dropping the oldest update");
                    }
                    pending.push_back(m);
                }
                None => return,
            },
            _ = tick.tick() => {}
        }
        while let Some(m) = pending.front() {
            let r = match m {
                Mirror::Put(rec) => d.store.put_address(rec).await.map(|_| ()),
                Mirror::Delete(rec) => d.store.delete_address(rec).await.map(|_| ()),
            };
            match r {
                Ok(()) => {
                    pending.pop_front();
                }
                Err(e) if e.is_retryable() => break,
                Err(e) => {
                    tracing::warn!("address index: {e}");
                    pending.pop_front();
                }
            }
        }
    }
}
