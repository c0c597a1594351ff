//! Pools and blocks: which pool and families a pod gets, leasing a block when a family has no room, and releasing blocks that stayed empty.

use super::*;

impl<B: Backend, K: KernelOps> Daemon<B, K> {
    /// [`Daemon::release_idle_blocks`] under the exclusive gate (the
    /// resync task calls it after each resync; tests call it directly).
    pub async fn release_idle_blocks_gated(&self) {
        let _g = self.gate.write().await;
        self.release_idle_blocks().await;
    }

    /// Releases blocks that stayed empty for two resyncs in a row, keeping
    /// `min_blocks` of each address family (so a node that served
    /// dual-stack pods keeps a block of each family, and can tell the
    /// pool's families from its blocks during a store outage). Called
    /// under the exclusive gate.
    pub(super) async fn release_idle_blocks(&self) {
        let (idle_now, mut leased) = {
            let st = self.lock();
            let mut leased: HashMap<Family, usize> = HashMap::new();
            for b in st.blocks().filter(|b| b.lease.state == LeaseState::Leased) {
                *leased.entry(Family::of(&b.lease.block)).or_default() += 1;
            }
            let idle: Vec<BlockLease> = st
                .blocks()
                .filter(|b| b.lease.state == LeaseState::Leased && b.used.is_empty())
                .map(|b| b.lease.clone())
                .collect();
            (idle, leased)
        };
        let ripe: Vec<BlockLease> = {
            let mut seen = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let now: BTreeSet<IpNet> = idle_now.iter().map(|l| l.block).collect();
            seen.retain(|b, _| now.contains(b));
            let mut ripe = Vec::new();
            for l in &idle_now {
                let n = seen.entry(l.block).or_insert(0);
                *n += 1;
                if *n >= 2 {
                    ripe.push(l.clone());
                }
            }
            ripe
        };
        for l in ripe {
            let keep = leased.entry(Family::of(&l.block)).or_default();
            if *keep <= self.cfg.min_blocks {
                continue;
            }
            match self.release_block(&l).await {
                Ok(()) => {
                    *keep -= 1;
                    self.idle
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&l.block);
                    tracing::info!(block = %l.block, pool = %l.pool, "released an empty block");
                }
                Err(e) => tracing::warn!(block = %l.block, "releasing an empty block: {e}"),
            }
        }
    }

    /// Releases one empty block: Releasing + intent durable, route
    /// withdrawn, store lease released (fenced by owner and epoch), then the
    /// record dropped. If the store cannot be read, nothing was asked of
    /// it: the block goes back to service and is released later. If the
    /// release itself fails, it may have been applied (a write that timed
    /// out): the block stays Releasing, out of service, and the next
    /// recovery pass finishes the release (found by the cluster simulator:
    /// putting it back in service served addresses from a block the store
    /// may already have given to another node).
    pub(super) async fn release_block(&self, l: &BlockLease) -> DResult<()> {
        let intent = Intent {
            id: self.journal.next_intent_id(),
            op: IntentOp::ReleaseBlock {
                pool: l.pool.clone(),
                block: l.block,
            },
            state: IntentState::Pending,
            created_unix: coil::journal::now_unix(),
        };
        let releasing = BlockLease {
            state: LeaseState::Releasing,
            ..l.clone()
        };
        let mut b = Batch::new();
        b.put_intent(&intent).put_lease(&releasing);
        self.journal.commit(b)?;
        coil::failpoint::hit("release.intent");
        self.lock().remove_lease(&l.block);
        self.kernel.withdraw_block(l.block).await?;
        // Err((e, written)): `written` when the release was sent.
        let res = async {
            let cur = match self.store.block(l.block).await {
                Ok((_, cur)) => cur,
                // A malformed value at the block's key is not a lease we
                // can prove is ours: leave it (reported by coilctl store
                // check) and forget our side.
                Err(e) if e.is_corrupt() => {
                    tracing::warn!(block = %l.block, "not releasing a malformed store entry: {e}");
                    None
                }
                Err(e) => return Err((e, false)),
            };
            match cur {
                Some(c)
                    if c.node == self.cfg.node_name
                        && u64::try_from(c.epoch).ok() == Some(l.epoch) =>
                {
                    self.store.release_block(&c).await.map_err(|e| (e, true))
                }
                // Already gone, or no longer ours: nothing to release.
                _ => Ok(()),
            }
        }
        .await;
        if res.is_ok() {
            coil::failpoint::hit("release.released");
        }
        let mut b = Batch::new();
        b.delete_intent(intent.id);
        match res {
            Ok(()) => {
                b.delete_lease(l.block);
                self.journal.commit(b)?;
                Ok(())
            }
            Err((e, true)) => {
                // Maybe released: Releasing and its intent stay; recovery
                // releases it (or finds it gone) and forgets it.
                tracing::warn!(block = %l.block, "the release may have been applied; the block stays out of service until recovery settles it: {e}");
                Err(e.into())
            }
            Err((e, false)) => {
                b.put_lease(l);
                self.journal.commit(b)?;
                self.lock().insert_lease(l.clone());
                self.kernel.export_block(l.block).await?;
                Err(e.into())
            }
        }
    }

    /// The pool for a pod and the families its pods get: the pool named
    /// like its namespace if there is one, else `default`.
    pub(super) async fn pool_for(
        self: &Arc<Self>,
        namespace: Option<&str>,
    ) -> DResult<(String, Vec<Family>)> {
        if let Some(ns) = namespace {
            if ns != "default" && coil::store::model::validate_pool_name(ns).is_ok() {
                if let Some(families) = self.pool_shape(ns).await? {
                    return Ok((ns.to_string(), families));
                }
            }
        }
        match self.pool_shape("default").await? {
            Some(families) => Ok(("default".into(), families)),
            None => Err(StoreError::PoolNotFound("default".into()).into()),
        }
    }

    /// The families of pool `name` (None: there is no such pool), from a
    /// cache of the store's answer. An entry older than `pool_cache_ttl`
    /// still answers at once and is refreshed in the background, so an ADD
    /// waits for the store only the first time a pool is asked for after a
    /// start (a store that hangs must not stall every ADD at each expiry).
    /// When that first read fails (outage, bad entry), the families of the
    /// blocks this node leases from the pool answer (idle release keeps one
    /// block of each family, see `release_idle_blocks`) and are cached.
    pub(super) async fn pool_shape(self: &Arc<Self>, name: &str) -> DResult<Option<Vec<Family>>> {
        let cached = self
            .pool_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned();
        if let Some((f, t)) = cached {
            if t.elapsed() >= self.cfg.pool_cache_ttl {
                self.refresh_pool_shape(name);
            }
            return Ok(f);
        }
        self.add_store_calls.fetch_add(1, Ordering::Relaxed);
        match self.read_pool_shape(name).await {
            Ok(f) => Ok(f),
            Err(e) => {
                let held = self.lock().families_of(name);
                if held.is_empty() {
                    return Err(e.into());
                }
                tracing::warn!(
                    pool = name,
                    families = ?held,
                    "reading the pool: {e}; serving the families of this node's blocks"
                );
                self.cache_pool_shape(name, Some(held.clone()));
                Ok(Some(held))
            }
        }
    }

    /// Reads pool `name`'s families from the store and caches them.
    pub(super) async fn read_pool_shape(
        &self,
        name: &str,
    ) -> Result<Option<Vec<Family>>, StoreError> {
        let f = self.store.get_pool(name).await?.map(|p| p.families());
        self.cache_pool_shape(name, f.clone());
        Ok(f)
    }

    pub(super) fn cache_pool_shape(&self, name: &str, f: Option<Vec<Family>>) {
        let mut cache = self.pool_cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= POOL_CACHE_MAX && !cache.contains_key(name) {
            let ttl = self.cfg.pool_cache_ttl;
            cache.retain(|_, (_, t)| t.elapsed() < ttl);
            if cache.len() >= POOL_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(name.to_string(), (f, Instant::now()));
    }

    /// Refreshes a stale cache entry off the ADD path. The entry's clock
    /// restarts first, so one refresh runs per pool and period, and a
    /// refresh that fails keeps the old answer for another period.
    pub(super) fn refresh_pool_shape(self: &Arc<Self>, name: &str) {
        if let Some(e) = self
            .pool_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(name)
        {
            e.1 = Instant::now();
        }
        let d = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            if let Err(e) = d.read_pool_shape(&name).await {
                tracing::debug!(pool = %name, "refreshing the pool's families: {e}");
            }
        });
    }

    pub(super) async fn pool_lock(&self, pool: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.pool_locks
            .lock()
            .await
            .entry(pool.to_string())
            .or_default()
            .clone()
    }

    /// Leases one more `family` block of `pool` (intent first), unless
    /// another ADD did while we waited for the pool's lock.
    pub(super) async fn acquire_block(&self, pool: &str, family: Family) -> DResult<()> {
        let lock = self.pool_lock(pool).await;
        let _g = lock.lock().await;
        if self.lock().has_room(pool, family) {
            return Ok(());
        }
        let id = self.journal.next_intent_id();
        let mut b = Batch::new();
        b.put_intent(&Intent {
            id,
            op: IntentOp::AcquireBlock {
                pool: pool.to_string(),
                block: None,
            },
            state: IntentState::Pending,
            created_unix: coil::journal::now_unix(),
        });
        self.commit(b).await?;
        coil::failpoint::hit("acquire.intent");
        self.add_store_calls.fetch_add(1, Ordering::Relaxed);
        let got = self
            .store
            .acquire_block_of(pool, Some(family), &self.cfg.node_name)
            .await;
        if matches!(got, Err(StoreError::NodeRemoved { .. })) {
            self.set_removed(true);
        }
        self.store_ok.store(
            !matches!(&got, Err(e) if e.is_unavailable()),
            Ordering::Relaxed,
        );
        if got.is_ok() {
            coil::failpoint::hit("acquire.leased");
        }
        let mut b = Batch::new();
        b.delete_intent(id);
        let lease = match got {
            Ok(l) => {
                let jl = journal_lease(&l);
                b.put_lease(&jl);
                Some(jl)
            }
            // The acquisition may have been applied and only its answer
            // lost (a write that timed out): the intent stays pending, so
            // the next recovery pass lists the store and adopts a lease of
            // this node the journal lacks, instead of leaking it.
            Err(e) if e.is_unavailable() => return Err(e.into()),
            Err(e) => {
                self.commit(b).await?;
                return Err(e.into());
            }
        };
        self.commit(b).await?;
        if let Some(l) = lease {
            tracing::info!(pool, block = %l.block, epoch = l.epoch, "leased a block");
            let block = l.block;
            self.lock().insert_lease(l);
            if let Err(e) = self.kernel.export_block(block).await {
                tracing::warn!(%block, "publishing the block in table {}: {e}", self.cfg.table_id);
            }
        }
        Ok(())
    }
}
