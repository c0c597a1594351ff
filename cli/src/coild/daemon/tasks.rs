//! coild's background tasks: journal health, periodic resync, liveness.

use super::*;

/// Watches the journal's health once a second (a failed sync in any
/// writer poisons it; then coild stops, see [`serve_until`]).
pub(super) async fn journal_watch<B: Backend, K: KernelOps>(d: Arc<Daemon<B, K>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        d.check_journal();
        if d.fatal_reason().is_some() {
            return;
        }
    }
}

/// Re-runs recovery every `resync_interval`: table 119, host routes and
/// aliases, lease losses, pending releases, idle blocks.
pub(super) async fn resync_task<B: Backend, K: KernelOps>(d: Arc<Daemon<B, K>>) {
    let mut tick = tokio::time::interval(d.cfg.resync_interval);
    tick.tick().await;
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        // A full link scan (orphans) on the first resync and every tenth:
        // it costs the kernel ~50 µs per veth.
        let full = n.is_multiple_of(10);
        n += 1;
        // The store is asked only about this node's own blocks: a resync
        // costs etcd the same at 5 nodes as at 5,000.
        match d.recover(false, full, false).await {
            Ok(out) => {
                for o in out.iter().filter(|o| !o.ok) {
                    tracing::warn!(action = %o.action, "resync: {}", o.error.as_deref().unwrap_or(""));
                }
                d.release_idle_blocks_gated().await;
                if full {
                    d.reconcile_index().await;
                }
            }
            Err(e) => tracing::warn!("resync: {e}"),
        }
    }
}

impl<B: Backend, K: KernelOps> Daemon<B, K> {
    fn liveness_ttl_secs(&self) -> i64 {
        self.cfg.liveness_ttl.as_secs().max(2) as i64
    }

    fn node_record(&self) -> NodeRecord {
        NodeRecord {
            node: self.cfg.node_name.clone(),
            boot_id: self.boot_id.clone(),
            started_unix: coil::journal::now_unix(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// Registers the node's liveness once, before the store is asked to
    /// confirm the leases after a start: the controller's removal is
    /// refused while the liveness key exists, so a confirmation read after
    /// it cannot be made stale by a removal decided while the node was off
    /// (found by the cluster simulator). Bounded: an unreachable store
    /// delays the start by at most 2 s, and the liveness task keeps trying.
    pub(super) async fn register_first(&self) -> Option<i64> {
        let ttl = self.liveness_ttl_secs();
        match tokio::time::timeout(
            Duration::from_secs(2),
            self.store.register_node(&self.node_record(), ttl),
        )
        .await
        {
            Ok(Ok(lease)) => Some(lease),
            Ok(Err(e)) => {
                tracing::warn!("registering this node's liveness: {e}");
                None
            }
            Err(_) => {
                tracing::warn!("registering this node's liveness: the store did not answer");
                None
            }
        }
    }
}

/// Keeps the node's liveness key alive; re-registers after expiry or an
/// outage. `lease`: the registration made at start, if it succeeded.
pub(super) async fn liveness_task<B: Backend, K: KernelOps>(
    d: Arc<Daemon<B, K>>,
    mut lease: Option<i64>,
) {
    let ttl = d.liveness_ttl_secs();
    let period = Duration::from_secs((ttl as u64 / 3).max(1));
    let rec = d.node_record();
    if lease.is_some() {
        tokio::time::sleep(period).await;
    }
    loop {
        let ok = match lease {
            Some(id) => d.store.keep_alive(id).await.unwrap_or(false),
            None => false,
        };
        if !ok {
            lease = d.store.register_node(&rec, ttl).await.ok();
        }
        d.store_ok.store(lease.is_some(), Ordering::Relaxed);
        tokio::time::sleep(period).await;
    }
}
