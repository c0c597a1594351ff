//! Block leases: acquisition (random probe, then a full scan that proves exhaustion), release, and the listings of blocks.

use super::*;

impl<B: Backend> Store<B> {
    // ----------------------------------------------------------- blocks

    /// Leases a free block of `pool` to `node`.
    ///
    /// The candidate is a random block; the transaction creates its key only
    /// if absent (and only if the pool is unchanged), and when that fails it
    /// returns, in the same request, the pool and the next
    /// `PROBE_WINDOW` leased keys, from which the next candidate is
    /// chosen. After `RANDOM_PROBES` full windows it reads the pool's
    /// whole block range, which either yields a free block or proves
    /// exhaustion. Typically one request per acquisition.
    ///
    /// The block is of the pool's first family (IPv4 in a dual-stack pool);
    /// [`Store::acquire_block_of`] names the family.
    pub async fn acquire_block(&self, pool_name: &str, node: &str) -> Result<BlockLease> {
        self.acquire_block_of(pool_name, None, node).await
    }

    /// Leases a free block of `family` (None: the pool's first family) of
    /// `pool` to `node`; see [`Store::acquire_block`].
    pub async fn acquire_block_of(
        &self,
        pool_name: &str,
        family: Option<Family>,
        node: &str,
    ) -> Result<BlockLease> {
        model::validate_pool_name(pool_name)?;
        model::validate_node_name(node)?;
        let mut pool = match self.cached_pool(pool_name) {
            Some(p) => p,
            None => {
                let p = self
                    .get_pool(pool_name)
                    .await?
                    .ok_or_else(|| StoreError::PoolNotFound(pool_name.to_string()))?;
                self.remember_pool(&p);
                p
            }
        };
        if family.is_some_and(|f| pool.family_range(f).is_empty()) {
            // The cached pool may predate the family's half of it (added
            // to the running pool): read it again before refusing.
            let p = self
                .get_pool(pool_name)
                .await?
                .ok_or_else(|| StoreError::PoolNotFound(pool_name.to_string()))?;
            self.remember_pool(&p);
            pool = p;
        }
        let mut next: Option<u64> = None;
        let mut full_windows = 0u32;
        let mut lost_races = 0u32;
        for _ in 0..self.retry.attempts {
            let family = family.unwrap_or(pool.family);
            let range = pool.family_range(family);
            if range.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "pool {pool_name} has no {family} subnet"
                )));
            }
            let index = match next.take() {
                Some(i) => i,
                None if full_windows >= RANDOM_PROBES => {
                    match self.scan_for_free(&pool, family).await? {
                        Scan::Free(i, p) => {
                            pool = p;
                            i
                        }
                        Scan::Changed(p) => {
                            pool = p;
                            continue;
                        }
                    }
                }
                None => self.draw(range),
            };
            let Some((block, subnet)) = pool.block_at(index) else {
                continue;
            };
            let key = self.keys.block(pool_name, &block);
            let (_, window_end) = self.keys.block_range(pool_name, &subnet);
            let lease = BlockLease {
                pool: pool_name.to_string(),
                block,
                node: node.to_string(),
                acquired_unix: now_unix(),
                epoch: 0,
            };
            let mut when = self.lease_guards(&pool, &key);
            when.push(self.not_removed(node));
            let txn = Txn {
                when,
                then: vec![Op::put(key.clone(), encode(&lease))],
                otherwise: vec![
                    Op::get(self.keys.pool(pool_name)),
                    Op::Range {
                        start: key.clone().into_bytes(),
                        end: window_end.into_bytes(),
                        limit: PROBE_WINDOW,
                        keys_only: true,
                    },
                    Op::get(self.keys.schema()),
                    Op::Range {
                        start: self.keys.removed(node).into_bytes(),
                        end: Vec::new(),
                        limit: 0,
                        keys_only: true,
                    },
                ],
            };
            let mut r = self.backend.txn("acquire block", txn).await?;
            if r.succeeded {
                return Ok(BlockLease {
                    epoch: r.revision,
                    ..lease
                });
            }
            if !r.kvs(3).is_empty() {
                return Err(StoreError::NodeRemoved {
                    node: node.to_string(),
                });
            }
            // Why did it fail? Pool changed or gone, schema changed, or the
            // candidate was taken.
            let current = match r.kvs(0).first() {
                None => {
                    self.forget_pool(pool_name);
                    return Err(StoreError::PoolNotFound(pool_name.to_string()));
                }
                Some(kv) => read_pool(&self.keys, kv).map_err(|b| self.refuse(b))?,
            };
            let window = r.kvs(1);
            if current.revision != pool.revision {
                self.remember_pool(&current);
                pool = current;
                continue;
            }
            if r.kvs(2).first().map(|kv| kv.value.as_slice()) != Some(schema_value().as_slice()) {
                self.schema().await?;
                return Err(StoreError::corrupt(
                    &self.keys.schema(),
                    "schema key missing or unreadable while pools exist",
                ));
            }
            // The candidate was taken: pick the first gap in the window.
            match first_gap(&pool, pool_name, &self.keys, index, &window) {
                Some(i) => {
                    if window.first().map(|kv| kv.key.as_slice()) == Some(key.as_bytes()) {
                        lost_races += 1;
                        if lost_races > 2 {
                            self.backoff(lost_races - 2).await;
                        }
                    }
                    next = Some(i)
                }
                None => full_windows += 1,
            }
        }
        Err(self.conflict("acquire block", &self.keys.pool_blocks(pool_name)))
    }

    /// Leases one named block of `pool` to `node` if it is free (recovery
    /// re-taking a block the store lost). Returns the lease, or
    /// `NotOwner` naming the node that holds it.
    pub async fn acquire_specific(
        &self,
        pool_name: &str,
        block: IpNet,
        node: &str,
    ) -> Result<BlockLease> {
        model::validate_node_name(node)?;
        let pool = self
            .get_pool(pool_name)
            .await?
            .ok_or_else(|| StoreError::PoolNotFound(pool_name.to_string()))?;
        if pool.index_of(&block).is_none() {
            return Err(StoreError::UnknownBlock { block });
        }
        let key = self.keys.block(pool_name, &block);
        let lease = BlockLease {
            pool: pool_name.to_string(),
            block,
            node: node.to_string(),
            acquired_unix: now_unix(),
            epoch: 0,
        };
        let mut when = self.lease_guards(&pool, &key);
        when.push(self.not_removed(node));
        let txn = Txn {
            when,
            then: vec![Op::put(key.clone(), encode(&lease))],
            otherwise: vec![
                Op::get(key.clone()),
                Op::Range {
                    start: self.keys.removed(node).into_bytes(),
                    end: Vec::new(),
                    limit: 0,
                    keys_only: true,
                },
            ],
        };
        let mut r = self.backend.txn("re-acquire block", txn).await?;
        if r.succeeded {
            return Ok(BlockLease {
                epoch: r.revision,
                ..lease
            });
        }
        if !r.kvs(1).is_empty() {
            return Err(StoreError::NodeRemoved {
                node: node.to_string(),
            });
        }
        match r.kvs(0).first() {
            None => Err(self.conflict("re-acquire block", &key)),
            // Occupied by a bad entry: neither ours nor free.
            Some(kv) => match read_lease(&self.keys, kv, Some(&pool)) {
                Err(b) => Err(self.refuse(b)),
                Ok(cur) if cur.node == node => Ok(cur),
                Ok(cur) => Err(StoreError::NotOwner {
                    block,
                    owner: cur.node,
                    node: node.to_string(),
                }),
            },
        }
    }

    /// Reads every leased key of the pool at one revision and picks a random
    /// free block, or proves the pool exhausted.
    pub(super) async fn scan_for_free(&self, pool: &Pool, family: Family) -> Result<Scan> {
        let prefix = self.keys.pool_blocks(&pool.name);
        let mut r = self
            .backend
            .txn(
                "scan pool blocks",
                Txn::read(vec![
                    Op::get(self.keys.pool(&pool.name)),
                    Op::Range {
                        start: prefix.clone().into_bytes(),
                        end: backend::prefix_end(prefix.as_bytes()),
                        limit: 0,
                        keys_only: true,
                    },
                ]),
            )
            .await?;
        let current = match r.kvs(0).first() {
            None => return Err(StoreError::PoolNotFound(pool.name.clone())),
            Some(kv) => read_pool(&self.keys, kv).map_err(|b| self.refuse(b))?,
        };
        if current.revision != pool.revision {
            self.remember_pool(&current);
            return Ok(Scan::Changed(current));
        }
        // Keys only: a key is occupied whatever its value, so a bad entry
        // at a block's key is never handed out. Keys that name none of the
        // pool's blocks occupy nothing (and do not count toward
        // exhaustion).
        let leased: HashSet<Vec<u8>> = r.kvs(1).into_iter().map(|kv| kv.key).collect();
        let occupied = leased
            .iter()
            .filter_map(|k| std::str::from_utf8(k).ok())
            .filter_map(|k| self.keys.block_of_key(pool, k))
            .filter(|b| Family::of(b) == family)
            .count();
        let range = pool.family_range(family);
        let total = range.end - range.start;
        if occupied as u64 >= total {
            return Err(StoreError::Exhausted {
                pool: pool.name.clone(),
                family,
                blocks: total,
            });
        }
        // Start at a random index and walk: finds a free block in O(total)
        // without building the whole free list.
        let start = self.draw(0..total);
        for step in 0..total {
            let i = range.start + (start + step) % total;
            if let Some((b, _)) = pool.block_at(i) {
                if !leased.contains(self.keys.block(&pool.name, &b).as_bytes()) {
                    return Ok(Scan::Free(i, current));
                }
            }
        }
        Err(StoreError::Exhausted {
            pool: pool.name.clone(),
            family,
            blocks: total,
        })
    }

    /// Guards of a lease creation: the pool is the version the block was
    /// chosen from, the schema is ours, and the block key is absent.
    /// Guard: `node` carries no removal fence.
    pub(super) fn not_removed(&self, node: &str) -> Cmp {
        Cmp::CreateRevision {
            key: self.keys.removed(node).into_bytes(),
            op: CmpOp::Equal,
            rev: 0,
        }
    }

    pub(super) fn lease_guards(&self, pool: &Pool, key: &str) -> Vec<Cmp> {
        vec![
            Cmp::ModRevision {
                key: self.keys.pool(&pool.name).into_bytes(),
                op: CmpOp::Equal,
                rev: pool.revision,
            },
            self.schema_guard(),
            Cmp::CreateRevision {
                key: key.as_bytes().to_vec(),
                op: CmpOp::Equal,
                rev: 0,
            },
        ]
    }

    /// The transaction that deletes a lease and its block's address index
    /// entries if the key is still the incarnation `lease` describes
    /// (create revision = epoch, value = the owner's bytes), plus `extra`
    /// guards; on failure it reads the key back.
    pub(super) fn release_txn(&self, lease: &BlockLease, extra: Vec<Cmp>) -> Txn {
        let key = self.keys.block(&lease.pool, &lease.block);
        let (a, b) = self.keys.address_range(&lease.block);
        let stored = BlockLease {
            epoch: 0,
            ..lease.clone()
        };
        let mut when = vec![
            Cmp::CreateRevision {
                key: key.clone().into_bytes(),
                op: CmpOp::Equal,
                rev: lease.epoch,
            },
            Cmp::ValueEquals {
                key: key.clone().into_bytes(),
                value: encode(&stored),
            },
            self.schema_guard(),
        ];
        when.extend(extra);
        Txn {
            when,
            then: vec![
                Op::Delete {
                    key: key.clone().into_bytes(),
                },
                Op::DeleteRange {
                    start: a.into_bytes(),
                    end: b.into_bytes(),
                },
            ],
            otherwise: vec![Op::get(key), Op::get(self.keys.pool(&lease.pool))],
        }
    }

    /// Releases a block lease, fenced by owner and epoch: it deletes the
    /// lease (and the address index entries inside the block) only if the
    /// key is still the incarnation `lease` describes.
    pub async fn release_block(&self, lease: &BlockLease) -> Result<()> {
        let key = self.keys.block(&lease.pool, &lease.block);
        let txn = self.release_txn(lease, vec![]);
        let mut r = self.backend.txn("release block", txn).await?;
        if r.succeeded {
            return Ok(());
        }
        let (cur, pool) = (r.kvs(0), r.kvs(1));
        match cur.first() {
            None => Err(StoreError::NotLeased { block: lease.block }),
            Some(kv) => {
                let pool = pool.first().and_then(|kv| read_pool(&self.keys, kv).ok());
                let cur = read_lease(&self.keys, kv, pool.as_ref()).map_err(|b| self.refuse(b))?;
                if cur.node != lease.node {
                    Err(StoreError::NotOwner {
                        block: lease.block,
                        owner: cur.node,
                        node: lease.node.clone(),
                    })
                } else if cur.epoch != lease.epoch {
                    Err(StoreError::StaleEpoch {
                        block: lease.block,
                        node: lease.node.clone(),
                        epoch: lease.epoch,
                        current: cur.epoch,
                    })
                } else {
                    // Same owner and epoch: the value or the schema differs.
                    self.schema().await?;
                    Err(StoreError::corrupt(
                        &key,
                        "lease value differs from what its owner wrote",
                    ))
                }
            }
        }
    }

    /// The lease of `block` (with its pool), if it is leased.
    /// [`StoreError::Corrupt`] if the block's key holds a bad entry: the
    /// block is then neither free nor anyone's as far as coil can tell.
    pub async fn block(&self, block: IpNet) -> Result<(Pool, Option<BlockLease>)> {
        let pools = self.list_pools().await?;
        let pool = pools
            .into_iter()
            .find(|p| p.index_of(&block).is_some())
            .ok_or(StoreError::UnknownBlock { block })?;
        let lease = match self
            .read_one("get block", self.keys.block(&pool.name, &block))
            .await?
        {
            None => None,
            Some(kv) => Some(read_lease(&self.keys, &kv, Some(&pool)).map_err(|b| self.refuse(b))?),
        };
        Ok((pool, lease))
    }

    /// Every valid lease, in pool and address order. Bad entries are
    /// skipped, counted and logged ([`Store::all_blocks_checked`] reports
    /// them).
    pub async fn all_blocks(&self) -> Result<Vec<BlockLease>> {
        Ok(self.logged("list blocks", self.all_blocks_checked().await?))
    }

    /// Every valid lease, and the bad entries under `blocks/`. Leases are
    /// validated against their pools, read at the same revision.
    pub async fn all_blocks_checked(&self) -> Result<Listing<BlockLease>> {
        let mut r = self
            .backend
            .txn(
                "list blocks",
                Txn::read(vec![
                    Op::prefix(&self.keys.pools()),
                    Op::prefix(&self.keys.blocks()),
                ]),
            )
            .await?;
        let pools = pools_by_name(&self.keys, &r.kvs(0));
        Ok(self.sift(&r.kvs(1), |kv| read_lease_in(&self.keys, kv, &pools)))
    }

    /// What a node's periodic resync needs from the store, in one read
    /// transaction whose cost does not grow with the cluster: the store's
    /// entries for `blocks` (the node's journal leases; a block with no
    /// entry is absent from the answer, a bad entry is skipped, counted and
    /// logged) and whether the node has a removal fence (a malformed fence
    /// counts as one: it is in the way of re-admission). A full listing of
    /// every block ([`Store::all_blocks`]) is only needed when the node may
    /// hold a lease its journal lacks (an acquisition in flight at a crash).
    /// `None` when there are more blocks than one transaction may read.
    pub async fn node_view(
        &self,
        node: &str,
        blocks: &[(String, IpNet)],
    ) -> Result<Option<NodeView>> {
        model::validate_node_name(node)?;
        if blocks.len() > NODE_VIEW_MAX_BLOCKS {
            return Ok(None);
        }
        let mut ops = vec![
            Op::prefix(&self.keys.pools()),
            Op::get(self.keys.removed(node)),
        ];
        ops.extend(
            blocks
                .iter()
                .map(|(pool, b)| Op::get(self.keys.block(pool, b))),
        );
        let mut r = self.backend.txn("read node view", Txn::read(ops)).await?;
        let pools = pools_by_name(&self.keys, &r.kvs(0));
        let removed = match r.kvs(1).first() {
            None => false,
            Some(kv) => {
                if let Err(b) =
                    read_keyed::<RemovalRecord>(kv, &self.keys.removed_prefix(), |v| &v.node)
                {
                    let e = self.refuse(b);
                    tracing::error!("{e}; counted as a removal fence");
                }
                true
            }
        };
        let mut kvs = Vec::new();
        for i in 0..blocks.len() {
            kvs.extend(r.kvs(i + 2));
        }
        let leases = self.logged(
            "read node view",
            self.sift(&kvs, |kv| read_lease_in(&self.keys, kv, &pools)),
        );
        Ok(Some(NodeView { leases, removed }))
    }

    /// The valid leases of `node` (bad entries are skipped, counted and
    /// logged).
    pub async fn node_blocks(&self, node: &str) -> Result<Vec<BlockLease>> {
        Ok(self.logged("list node blocks", self.node_blocks_checked(node).await?))
    }

    /// The valid leases of `node`, and every bad entry under `blocks/`
    /// (whose owner cannot be told, so any of them may be this node's).
    pub async fn node_blocks_checked(&self, node: &str) -> Result<Listing<BlockLease>> {
        model::validate_node_name(node)?;
        let mut l = self.all_blocks_checked().await?;
        l.items.retain(|l| l.node == node);
        Ok(l)
    }

    /// Administrative release (`coilctl block release`): refused while the
    /// owner is alive unless `force`.
    pub async fn admin_release(&self, node: &str, block: IpNet, force: bool) -> Result<BlockLease> {
        model::validate_node_name(node)?;
        let (_, lease) = self.block(block).await?;
        let lease = lease.ok_or(StoreError::NotLeased { block })?;
        if lease.node != node {
            return Err(StoreError::NotOwner {
                block,
                owner: lease.node,
                node: node.to_string(),
            });
        }
        if !force && self.node(node).await?.is_some() {
            return Err(StoreError::NodeAlive {
                node: node.to_string(),
            });
        }
        self.release_block(&lease).await?;
        Ok(lease)
    }
}
