//! Pools and subnets: create, grow, show, remove, and their usage.

use super::*;

impl<B: Backend> Store<B> {
    // ------------------------------------------------------------ pools

    /// Creates a pool. Refused if the name is taken or any subnet overlaps a
    /// subnet of any pool; the overlap check and the creation are fenced in
    /// one transaction.
    pub async fn create_pool(&self, spec: &PoolSpec) -> Result<Pool> {
        model::validate_spec(spec)?;
        let pool_key = self.keys.pool(&spec.name);
        let mut subnets = spec.subnets.clone();
        subnets.sort();
        self.optimistic("create pool", &pool_key, || async {
            let (existing, registered, schema, rev) = self.read_registry(&spec.name).await?;
            if existing.is_some() {
                return Err(StoreError::PoolExists(spec.name.clone()));
            }
            for s in &subnets {
                if let Some(o) = find_overlap(s, &registered) {
                    return Err(StoreError::SubnetOverlap {
                        subnet: *s,
                        existing: o.subnet,
                        pool: o.pool.clone(),
                    });
                }
            }
            let pool = spec.to_pool(now_unix());
            let mut when = vec![
                Cmp::CreateRevision {
                    key: pool_key.clone().into_bytes(),
                    op: CmpOp::Equal,
                    rev: 0,
                },
                self.registry_unchanged(rev),
            ];
            let mut then = vec![Op::put(pool_key.clone(), encode(&pool))];
            match schema {
                Some(_) => when.push(self.schema_guard()),
                None => {
                    when.push(Cmp::CreateRevision {
                        key: self.keys.schema().into_bytes(),
                        op: CmpOp::Equal,
                        rev: 0,
                    });
                    then.push(Op::put(self.keys.schema(), schema_value()));
                }
            }
            for s in &subnets {
                then.push(Op::put(
                    self.keys.subnet(s),
                    encode(&SubnetRecord {
                        subnet: *s,
                        pool: spec.name.clone(),
                    }),
                ));
            }
            let r = self
                .backend
                .txn(
                    "create pool",
                    Txn {
                        when,
                        then,
                        otherwise: vec![],
                    },
                )
                .await?;
            if r.succeeded {
                return Ok(Try::Done(Pool {
                    revision: r.revision,
                    ..pool
                }));
            }
            Ok(Try::Lost)
        })
        .await
    }

    /// Adds a subnet to a pool, refusing overlaps with every pool.
    pub async fn add_subnet(&self, name: &str, subnet: IpNet) -> Result<Pool> {
        self.add_subnet_with(name, subnet, None).await
    }

    /// Adds a subnet to a pool, refusing overlaps with every pool. A subnet
    /// of a family the pool lacks gives the pool that family (an IPv4
    /// pool becomes dual-stack: its pods from then on get an IPv6 address
    /// too), with `block_size` for its blocks, which it then needs; for a
    /// family the pool has, `block_size` may only repeat that family's.
    pub async fn add_subnet_with(
        &self,
        name: &str,
        subnet: IpNet,
        block_size: Option<u8>,
    ) -> Result<Pool> {
        model::validate_pool_name(name)?;
        model::check_not_reserved(&subnet)?;
        let pool_key = self.keys.pool(name);
        self.optimistic("add subnet", &pool_key, || async {
            let (existing, registered, _, rev) = self.read_registry(name).await?;
            let mut pool = existing.ok_or_else(|| StoreError::PoolNotFound(name.to_string()))?;
            let family = Family::of(&subnet);
            let n = pool.all_subnets().count();
            if n >= model::MAX_SUBNETS_PER_POOL {
                return Err(StoreError::Invalid(format!(
                    "pool {name} already has {n} subnets, the most a pool holds"
                )));
            }
            if let Some(o) = find_overlap(&subnet, &registered) {
                return Err(StoreError::SubnetOverlap {
                    subnet,
                    existing: o.subnet,
                    pool: o.pool.clone(),
                });
            }
            let pool_rev = pool.revision;
            match (pool.block_size_of(family), block_size) {
                (Some(have), Some(asked)) if have != asked => {
                    return Err(StoreError::Invalid(format!(
                        "pool {name}'s {family} blocks have block size {have}, not {asked}; \
                         leave the block size out"
                    )))
                }
                (Some(have), _) => {
                    model::validate_subnet(&subnet, family, have)?;
                    match pool.ipv6.as_mut() {
                        Some(part) if family == Family::Ipv6 => {
                            part.subnets.push(subnet);
                            part.subnets.sort();
                        }
                        _ => {
                            pool.subnets.push(subnet);
                            pool.subnets.sort();
                        }
                    }
                }
                (None, None) => {
                    return Err(StoreError::Invalid(format!(
                        "subnet {subnet} is {family}, but pool {name} is {} only; to give \
                         its pods {family} addresses too, add it with a block size for its \
                         {family} blocks (coilctl pool add-subnet {name} {subnet} \
                         --block-size N)",
                        pool.family
                    )))
                }
                (None, Some(bs)) => {
                    // A second family: the pool's shape is rebuilt from all
                    // its subnets (IPv4 first; block indices are not stored,
                    // leases are keyed by address, so none moves).
                    let (v4_bs, v6_bs) = match family {
                        Family::Ipv4 => (bs, pool.block_size),
                        Family::Ipv6 => (pool.block_size, bs),
                    };
                    let spec = PoolSpec {
                        name: name.to_string(),
                        subnets: pool.all_subnets().copied().chain([subnet]).collect(),
                        block_size: v4_bs,
                        ipv6_block_size: Some(v6_bs),
                    };
                    model::validate_spec(&spec)?;
                    pool = Pool {
                        revision: pool_rev,
                        ..spec.to_pool(pool.created_unix)
                    };
                }
            }
            let when = vec![
                Cmp::ModRevision {
                    key: pool_key.clone().into_bytes(),
                    op: CmpOp::Equal,
                    rev: pool_rev,
                },
                self.registry_unchanged(rev),
                self.schema_guard(),
            ];
            let then = vec![
                Op::put(pool_key.clone(), encode(&pool)),
                Op::put(
                    self.keys.subnet(&subnet),
                    encode(&SubnetRecord {
                        subnet,
                        pool: name.to_string(),
                    }),
                ),
            ];
            let r = self
                .backend
                .txn(
                    "add subnet",
                    Txn {
                        when,
                        then,
                        otherwise: vec![],
                    },
                )
                .await?;
            if r.succeeded {
                self.forget_pool(name);
                return Ok(Try::Done(Pool {
                    revision: r.revision,
                    ..pool
                }));
            }
            Ok(Try::Lost)
        })
        .await
    }

    /// Reads a pool, the subnet registry and the schema at one revision.
    pub(super) async fn read_registry(
        &self,
        name: &str,
    ) -> Result<(Option<Pool>, Vec<SubnetRecord>, Option<u32>, i64)> {
        let mut r = self
            .backend
            .txn(
                "read subnets",
                Txn::read(vec![
                    Op::get(self.keys.pool(name)),
                    Op::prefix(&self.keys.subnets()),
                    Op::get(self.keys.schema()),
                ]),
            )
            .await?;
        let pool = match r.kvs(0).first() {
            None => None,
            Some(kv) => Some(read_pool(&self.keys, kv).map_err(|b| self.refuse(b))?),
        };
        let subnet_kvs = r.kvs(1);
        let listed = self.sift(&subnet_kvs, |kv| read_subnet(&self.keys, kv));
        for b in &listed.bad {
            self.log_bad("read subnets", b);
        }
        let mut registered = listed.items;
        // Occupied is occupied: the subnet a bad entry's key names still
        // counts for the overlap check (a key that names no subnet claims
        // nothing).
        for b in listed.bad {
            if let Some(subnet) = self.keys.subnet_of_key(&b.key) {
                registered.push(SubnetRecord {
                    subnet,
                    pool: format!("? (its registry entry {} is bad: {})", b.key, b.reason),
                });
            }
        }
        let schema = match r.kvs(2).first() {
            Some(kv) => {
                let s: SchemaRecord = decode(kv)?;
                if s.version != SCHEMA_VERSION {
                    return Err(StoreError::SchemaTooNew {
                        endpoint: self.backend.describe(),
                        found: s.version,
                        supported: SCHEMA_VERSION,
                    });
                }
                Some(s.version)
            }
            None => None,
        };
        if schema.is_none() && !subnet_kvs.is_empty() {
            return Err(StoreError::corrupt(
                &self.keys.schema(),
                "subnets are registered but the schema key is missing",
            ));
        }
        Ok((pool, registered, schema, r.revision))
    }

    /// Guard: no subnet was registered since revision `rev`.
    pub(super) fn registry_unchanged(&self, rev: i64) -> Cmp {
        let start = self.keys.subnets();
        Cmp::RangeUnchangedBefore {
            end: backend::prefix_end(start.as_bytes()),
            start: start.into_bytes(),
            rev: rev + 1,
        }
    }

    /// The pool `name`, if it exists; [`StoreError::Corrupt`] if its entry
    /// is bad.
    pub async fn get_pool(&self, name: &str) -> Result<Option<Pool>> {
        model::validate_pool_name(name)?;
        match self.read_one("get pool", self.keys.pool(name)).await? {
            None => Ok(None),
            Some(kv) => read_pool(&self.keys, &kv)
                .map(Some)
                .map_err(|b| self.refuse(b)),
        }
    }

    /// Every valid pool, by name (bad entries are skipped, counted and
    /// logged; [`Store::list_pools_checked`] reports them).
    pub async fn list_pools(&self) -> Result<Vec<Pool>> {
        Ok(self.logged("list pools", self.list_pools_checked().await?))
    }

    /// Every pool, by name, and the bad entries under `pools/`.
    pub async fn list_pools_checked(&self) -> Result<Listing<Pool>> {
        let kvs = self.read_prefix("list pools", &self.keys.pools()).await?;
        Ok(self.sift(&kvs, |kv| read_pool(&self.keys, kv)))
    }

    /// Every valid pool's size in blocks and how many of its block keys
    /// are taken (a bad entry occupies its key like a lease), per address
    /// family (one family can run out while the other has room), in one
    /// read of the block keys without their values: what the controller
    /// exports for the pool alerts on each pass.
    pub async fn pool_capacity(&self) -> Result<Vec<(String, Family, u64, u64)>> {
        let mut r = self
            .backend
            .txn(
                "read pool capacity",
                Txn::read(vec![
                    Op::prefix(&self.keys.pools()),
                    Op::Range {
                        start: self.keys.blocks().into_bytes(),
                        end: backend::prefix_end(self.keys.blocks().as_bytes()),
                        limit: 0,
                        keys_only: true,
                    },
                ]),
            )
            .await?;
        let pools = self.logged(
            "read pool capacity",
            self.sift(&r.kvs(0), |kv| read_pool(&self.keys, kv)),
        );
        let by_name: HashMap<&str, &Pool> = pools.iter().map(|p| (p.name.as_str(), p)).collect();
        let mut taken: HashMap<(String, Family), u64> = HashMap::new();
        for kv in r.kvs(1) {
            let key = kv.key_str();
            let Some((pool, _)) = self.keys.split_block_key(&key) else {
                continue;
            };
            let Some(p) = by_name.get(pool) else {
                continue;
            };
            if let Some(b) = self.keys.block_of_key(p, &key) {
                *taken.entry((pool.to_string(), Family::of(&b))).or_default() += 1;
            }
        }
        Ok(pools
            .iter()
            .flat_map(|p| {
                let taken = &taken;
                p.families().into_iter().map(move |f| {
                    let leased = taken.get(&(p.name.clone(), f)).copied().unwrap_or(0);
                    (p.name.clone(), f, p.family_range(f).count() as u64, leased)
                })
            })
            .collect())
    }

    /// A pool and its leased blocks, read at one revision.
    pub async fn pool_usage(&self, name: &str) -> Result<PoolUsage> {
        model::validate_pool_name(name)?;
        let mut r = self
            .backend
            .txn(
                "show pool",
                Txn::read(vec![
                    Op::get(self.keys.pool(name)),
                    Op::prefix(&self.keys.pool_blocks(name)),
                ]),
            )
            .await?;
        let pool = match r.kvs(0).first() {
            None => return Err(StoreError::PoolNotFound(name.to_string())),
            Some(kv) => read_pool(&self.keys, kv).map_err(|b| self.refuse(b))?,
        };
        let listed = self.sift(&r.kvs(1), |kv| read_lease(&self.keys, kv, Some(&pool)));
        Ok(PoolUsage {
            pool,
            leases: listed.items,
            bad: listed.bad,
        })
    }

    /// Removes a pool. Refused while any block is leased; with `force`,
    /// leased blocks are deleted too, but only if the address index shows no
    /// address in use anywhere in the pool.
    pub async fn remove_pool(&self, name: &str, force: bool) -> Result<RemovedPool> {
        model::validate_pool_name(name)?;
        let pool_key = self.keys.pool(name);
        self.optimistic("remove pool", &pool_key, || async {
            let usage = self.pool_usage(name).await?;
            let pool = usage.pool;
            let mut reads = Vec::new();
            for s in pool.all_subnets() {
                let (a, b) = self.keys.address_range(s);
                reads.push(Op::Range {
                    start: a.into_bytes(),
                    end: b.into_bytes(),
                    limit: 0,
                    keys_only: true,
                });
            }
            reads.push(Op::prefix(&self.keys.pool_blocks(name)));
            reads.push(Op::get(pool_key.clone()));
            let mut r = self
                .backend
                .txn("read pool usage", Txn::read(reads))
                .await?;
            let rev = r.revision;
            let n = pool.all_subnets().count();
            let addresses: usize = (0..n).map(|i| r.kvs(i).len()).sum();
            // pool_usage above already counted and logged the bad entries.
            let listed = partition(&r.kvs(n), |kv| read_lease(&self.keys, kv, Some(&pool)));
            let entries = listed.items.len() + listed.bad.len();
            let current = r.kvs(n + 1);
            match current.first() {
                None => return Err(StoreError::PoolNotFound(name.to_string())),
                Some(kv) if kv.mod_revision != pool.revision => return Ok(Try::Lost),
                Some(_) => {}
            }
            // A bad entry under blocks/<pool>/ occupies its key like a
            // lease: it is removed only by an explicit --force.
            if entries > 0 && !force {
                let mut nodes: Vec<String> = listed.items.iter().map(|l| l.node.clone()).collect();
                nodes.sort();
                nodes.dedup();
                if !listed.bad.is_empty() {
                    nodes.push(format!(
                        "{} bad entr{} (coilctl pool show {name})",
                        listed.bad.len(),
                        if listed.bad.len() == 1 { "y" } else { "ies" }
                    ));
                }
                return Err(StoreError::PoolInUse {
                    pool: name.to_string(),
                    blocks: entries,
                    nodes: nodes.join(", "),
                });
            }
            if addresses > 0 {
                return Err(StoreError::PoolNotEmpty {
                    pool: name.to_string(),
                    addresses,
                });
            }
            let blocks_prefix = self.keys.pool_blocks(name);
            let mut when = vec![
                Cmp::ModRevision {
                    key: pool_key.clone().into_bytes(),
                    op: CmpOp::Equal,
                    rev: pool.revision,
                },
                Cmp::RangeUnchangedBefore {
                    start: blocks_prefix.clone().into_bytes(),
                    end: backend::prefix_end(blocks_prefix.as_bytes()),
                    rev: rev + 1,
                },
                self.schema_guard(),
            ];
            let mut then = vec![
                Op::Delete {
                    key: pool_key.clone().into_bytes(),
                },
                Op::DeleteRange {
                    start: blocks_prefix.clone().into_bytes(),
                    end: backend::prefix_end(blocks_prefix.as_bytes()),
                },
            ];
            for s in pool.all_subnets() {
                let (a, b) = self.keys.address_range(s);
                when.push(Cmp::RangeUnchangedBefore {
                    start: a.into_bytes(),
                    end: b.into_bytes(),
                    rev: rev + 1,
                });
                then.push(Op::Delete {
                    key: self.keys.subnet(s).into_bytes(),
                });
            }
            let r = self
                .backend
                .txn(
                    "remove pool",
                    Txn {
                        when,
                        then,
                        otherwise: vec![],
                    },
                )
                .await?;
            if r.succeeded {
                self.forget_pool(name);
                if !listed.bad.is_empty() {
                    tracing::warn!(
                        pool = name,
                        bad = ?listed.bad,
                        "removed the pool with --force, deleting its bad block entries too"
                    );
                }
                return Ok(Try::Done(RemovedPool {
                    pool: name.to_string(),
                    blocks_released: entries,
                }));
            }
            Ok(Try::Lost)
        })
        .await
    }

    pub(super) fn forget_pool(&self, name: &str) {
        self.pool_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    pub(super) fn cached_pool(&self, name: &str) -> Option<Pool> {
        self.pool_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    pub(super) fn remember_pool(&self, pool: &Pool) {
        self.pool_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pool.name.clone(), pool.clone());
    }
}
