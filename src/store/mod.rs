//! The cluster store: pools, subnets, fenced block leases, node liveness and
//! the address index.
//!
//! [`Store`] holds every rule (validation, overlap refusal, block choice,
//! fencing, bounded retry) and speaks to a [`Backend`]: etcd in a cluster,
//! or the node's journal for single-node use. The key layout is in
//! docs/etcd-schema.md.

pub mod backend;
pub mod embedded;
mod error;
pub mod etcd;
pub mod model;
pub mod remote;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use ipnet::IpNet;
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use backend::{Backend, BackendError, BackendErrorKind};
use backend::{Cmp, CmpOp, KeyValue, Op, Txn};
pub use error::StoreError;
use model::{find_overlap, schema_value, Keys, SchemaRecord, SCHEMA_VERSION};
pub use model::{
    AddressRecord, BlockLease, Family, NodeRecord, NodeStatus, Pool, PoolSpec, SubnetRecord,
};

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How hard optimistic transactions try before giving up.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Transactions per operation before [`StoreError::Conflict`].
    pub attempts: u32,
    /// First backoff after a lost race; doubles up to `max_backoff`, with
    /// jitter.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 16,
            backoff: Duration::from_millis(2),
            max_backoff: Duration::from_millis(200),
        }
    }
}

/// Keys one acquisition looks at past its random start when the start is
/// taken, in the same request.
const PROBE_WINDOW: i64 = 64;
/// Random probes whose windows were all full before acquisition falls back
/// to reading the pool's whole block range (which also proves exhaustion).
const RANDOM_PROBES: u32 = 3;

/// What `remove_pool` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedPool {
    pub pool: String,
    /// Leased blocks deleted along with the pool (only with `force`).
    pub blocks_released: usize,
}

/// A pool with its leases, for `pool show`.
#[derive(Debug, Clone)]
pub struct PoolUsage {
    pub pool: Pool,
    pub leases: Vec<BlockLease>,
}

/// What the store knows about one address.
#[derive(Debug, Clone)]
pub struct AddressInfo {
    pub address: IpAddr,
    pub pool: Option<String>,
    pub block: Option<IpNet>,
    pub lease: Option<BlockLease>,
    pub record: Option<AddressRecord>,
}

/// The cluster store over a backend.
#[derive(Debug)]
pub struct Store<B: Backend> {
    backend: B,
    keys: Keys,
    retry: RetryPolicy,
    /// Pools read by acquisitions, fenced by their revision in every
    /// acquisition transaction (a stale entry costs one failed txn).
    pool_cache: Mutex<HashMap<String, Pool>>,
}

impl<B: Backend> Store<B> {
    /// Opens the store under `prefix` and checks its schema version. Reads
    /// only; nothing is written until the first pool is created.
    pub async fn open(backend: B, prefix: &str) -> Result<Store<B>> {
        let keys = Keys::new(prefix)?;
        let s = Store {
            backend,
            keys,
            retry: RetryPolicy::default(),
            pool_cache: Mutex::new(HashMap::new()),
        };
        s.schema().await?;
        Ok(s)
    }

    /// Builds the store without reading anything, for a daemon that must
    /// start (and serve from its journal) while the store is unreachable.
    /// Call [`Store::schema`] once it is reachable.
    pub fn open_lazy(backend: B, prefix: &str) -> Result<Store<B>> {
        Ok(Store {
            backend,
            keys: Keys::new(prefix)?,
            retry: RetryPolicy::default(),
            pool_cache: Mutex::new(HashMap::new()),
        })
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The stored schema version, if any; refuses a newer one.
    pub async fn schema(&self) -> Result<Option<u32>> {
        match self
            .read_one("read schema", self.keys.schema())
            .await?
            .as_ref()
        {
            None => Ok(None),
            Some(kv) => {
                let rec: SchemaRecord = decode(kv)?;
                if rec.version > SCHEMA_VERSION {
                    return Err(StoreError::SchemaTooNew {
                        endpoint: self.backend.describe(),
                        found: rec.version,
                        supported: SCHEMA_VERSION,
                    });
                }
                Ok(Some(rec.version))
            }
        }
    }

    /// Reads one key.
    async fn read_one(&self, op: &str, key: String) -> Result<Option<KeyValue>> {
        let mut r = self.backend.txn(op, Txn::read(vec![Op::get(key)])).await?;
        Ok(r.kvs(0).into_iter().next())
    }

    /// Reads every key under `prefix`, in key order.
    async fn read_prefix(&self, op: &str, prefix: &str) -> Result<Vec<KeyValue>> {
        let mut r = self
            .backend
            .txn(op, Txn::read(vec![Op::prefix(prefix)]))
            .await?;
        Ok(r.kvs(0))
    }

    fn schema_guard(&self) -> Cmp {
        Cmp::ValueEquals {
            key: self.keys.schema().into_bytes(),
            value: schema_value(),
        }
    }

    async fn backoff(&self, attempt: u32) {
        if attempt == 0 {
            return;
        }
        let base = self.retry.backoff.saturating_mul(1 << attempt.min(10));
        let cap = base.min(self.retry.max_backoff);
        let jitter = rand::thread_rng().gen_range(0..=cap.as_micros() as u64);
        tokio::time::sleep(Duration::from_micros(jitter)).await;
    }

    fn conflict(&self, op: &str, key: &str) -> StoreError {
        StoreError::Conflict {
            op: op.to_string(),
            key: key.to_string(),
            attempts: self.retry.attempts,
        }
    }

    // ------------------------------------------------------------ pools

    /// Creates a pool. Refused if the name is taken or any subnet overlaps a
    /// subnet of any pool; the overlap check and the creation are fenced in
    /// one transaction.
    pub async fn create_pool(&self, spec: &PoolSpec) -> Result<Pool> {
        let family = model::validate_spec(spec)?;
        let pool_key = self.keys.pool(&spec.name);
        let mut subnets = spec.subnets.clone();
        subnets.sort();
        for attempt in 0..self.retry.attempts {
            self.backoff(attempt).await;
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
            let pool = Pool {
                name: spec.name.clone(),
                family,
                block_size: spec.block_size,
                subnets: subnets.clone(),
                created_unix: now_unix(),
                revision: 0,
            };
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
                return Ok(Pool {
                    revision: r.revision,
                    ..pool
                });
            }
        }
        Err(self.conflict("create pool", &pool_key))
    }

    /// Adds a subnet to a pool, refusing overlaps with every pool.
    pub async fn add_subnet(&self, name: &str, subnet: IpNet) -> Result<Pool> {
        model::validate_pool_name(name)?;
        let pool_key = self.keys.pool(name);
        for attempt in 0..self.retry.attempts {
            self.backoff(attempt).await;
            let (existing, registered, _, rev) = self.read_registry(name).await?;
            let mut pool = existing.ok_or_else(|| StoreError::PoolNotFound(name.to_string()))?;
            model::validate_subnet(&subnet, pool.family, pool.block_size)?;
            if pool.subnets.len() >= model::MAX_SUBNETS_PER_POOL {
                return Err(StoreError::Invalid(format!(
                    "pool {name} already has {} subnets, the most a pool holds",
                    pool.subnets.len()
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
            pool.subnets.push(subnet);
            pool.subnets.sort();
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
                return Ok(Pool {
                    revision: r.revision,
                    ..pool
                });
            }
        }
        Err(self.conflict("add subnet", &pool_key))
    }

    /// Reads a pool, the subnet registry and the schema at one revision.
    async fn read_registry(
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
        let pool = r.kvs(0).first().map(decode_pool).transpose()?;
        let registered = r
            .kvs(1)
            .iter()
            .map(decode::<SubnetRecord>)
            .collect::<Result<Vec<_>>>()?;
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
        if schema.is_none() && !registered.is_empty() {
            return Err(StoreError::corrupt(
                &self.keys.schema(),
                "subnets are registered but the schema key is missing",
            ));
        }
        Ok((pool, registered, schema, r.revision))
    }

    /// Guard: no subnet was registered since revision `rev`.
    fn registry_unchanged(&self, rev: i64) -> Cmp {
        let start = self.keys.subnets();
        Cmp::RangeUnchangedBefore {
            end: backend::prefix_end(start.as_bytes()),
            start: start.into_bytes(),
            rev: rev + 1,
        }
    }

    pub async fn get_pool(&self, name: &str) -> Result<Option<Pool>> {
        model::validate_pool_name(name)?;
        self.read_one("get pool", self.keys.pool(name))
            .await?
            .as_ref()
            .map(decode_pool)
            .transpose()
    }

    /// Every pool, by name.
    pub async fn list_pools(&self) -> Result<Vec<Pool>> {
        self.read_prefix("list pools", &self.keys.pools())
            .await?
            .iter()
            .map(decode_pool)
            .collect()
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
        let pool = r
            .kvs(0)
            .first()
            .map(decode_pool)
            .transpose()?
            .ok_or_else(|| StoreError::PoolNotFound(name.to_string()))?;
        let leases = r
            .kvs(1)
            .iter()
            .map(decode_lease)
            .collect::<Result<Vec<_>>>()?;
        Ok(PoolUsage { pool, leases })
    }

    /// Removes a pool. Refused while any block is leased; with `force`,
    /// leased blocks are deleted too, but only if the address index shows no
    /// address in use anywhere in the pool.
    pub async fn remove_pool(&self, name: &str, force: bool) -> Result<RemovedPool> {
        model::validate_pool_name(name)?;
        let pool_key = self.keys.pool(name);
        for attempt in 0..self.retry.attempts {
            self.backoff(attempt).await;
            let usage = self.pool_usage(name).await?;
            let pool = usage.pool;
            let mut reads = Vec::new();
            for s in &pool.subnets {
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
            let n = pool.subnets.len();
            let addresses: usize = (0..n).map(|i| r.kvs(i).len()).sum();
            let leases = r
                .kvs(n)
                .iter()
                .map(decode_lease)
                .collect::<Result<Vec<_>>>()?;
            let current = r.kvs(n + 1);
            match current.first() {
                None => return Err(StoreError::PoolNotFound(name.to_string())),
                Some(kv) if kv.mod_revision != pool.revision => continue,
                Some(_) => {}
            }
            if !leases.is_empty() && !force {
                let mut nodes: Vec<&str> = leases.iter().map(|l| l.node.as_str()).collect();
                nodes.sort();
                nodes.dedup();
                return Err(StoreError::PoolInUse {
                    pool: name.to_string(),
                    blocks: leases.len(),
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
            for s in &pool.subnets {
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
                return Ok(RemovedPool {
                    pool: name.to_string(),
                    blocks_released: leases.len(),
                });
            }
        }
        Err(self.conflict("remove pool", &pool_key))
    }

    fn forget_pool(&self, name: &str) {
        self.pool_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    fn cached_pool(&self, name: &str) -> Option<Pool> {
        self.pool_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    fn remember_pool(&self, pool: &Pool) {
        self.pool_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pool.name.clone(), pool.clone());
    }

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
    pub async fn acquire_block(&self, pool_name: &str, node: &str) -> Result<BlockLease> {
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
        let mut next: Option<u64> = None;
        let mut full_windows = 0u32;
        let mut lost_races = 0u32;
        for _ in 0..self.retry.attempts {
            let total = pool.total_blocks();
            let index = match next.take() {
                Some(i) => i,
                None if full_windows >= RANDOM_PROBES => match self.scan_for_free(&pool).await? {
                    Scan::Free(i, p) => {
                        pool = p;
                        i
                    }
                    Scan::Changed(p) => {
                        pool = p;
                        continue;
                    }
                },
                None => rand::thread_rng().gen_range(0..total),
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
            let txn = Txn {
                when: self.lease_guards(&pool, &key),
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
                ],
            };
            let mut r = self.backend.txn("acquire block", txn).await?;
            if r.succeeded {
                return Ok(BlockLease {
                    epoch: r.revision,
                    ..lease
                });
            }
            // Why did it fail? Pool changed or gone, schema changed, or the
            // candidate was taken.
            let current = match r.kvs(0).first() {
                None => {
                    self.forget_pool(pool_name);
                    return Err(StoreError::PoolNotFound(pool_name.to_string()));
                }
                Some(kv) => decode_pool(kv)?,
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
        let txn = Txn {
            when: self.lease_guards(&pool, &key),
            then: vec![Op::put(key.clone(), encode(&lease))],
            otherwise: vec![Op::get(key.clone())],
        };
        let mut r = self.backend.txn("re-acquire block", txn).await?;
        if r.succeeded {
            return Ok(BlockLease {
                epoch: r.revision,
                ..lease
            });
        }
        match r.kvs(0).first().map(decode_lease).transpose()? {
            Some(cur) if cur.node == node => Ok(cur),
            Some(cur) => Err(StoreError::NotOwner {
                block,
                owner: cur.node,
                node: node.to_string(),
            }),
            None => Err(self.conflict("re-acquire block", &key)),
        }
    }

    /// Reads every leased key of the pool at one revision and picks a random
    /// free block, or proves the pool exhausted.
    async fn scan_for_free(&self, pool: &Pool) -> Result<Scan> {
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
        let current = r
            .kvs(0)
            .first()
            .map(decode_pool)
            .transpose()?
            .ok_or_else(|| StoreError::PoolNotFound(pool.name.clone()))?;
        if current.revision != pool.revision {
            self.remember_pool(&current);
            return Ok(Scan::Changed(current));
        }
        let leased: std::collections::HashSet<Vec<u8>> =
            r.kvs(1).into_iter().map(|kv| kv.key).collect();
        let total = pool.total_blocks();
        if leased.len() as u64 >= total {
            return Err(StoreError::Exhausted {
                pool: pool.name.clone(),
                blocks: total,
            });
        }
        // Start at a random index and walk: finds a free block in O(total)
        // without building the whole free list.
        let start = rand::thread_rng().gen_range(0..total);
        for step in 0..total {
            let i = (start + step) % total;
            if let Some((b, _)) = pool.block_at(i) {
                if !leased.contains(self.keys.block(&pool.name, &b).as_bytes()) {
                    return Ok(Scan::Free(i, current));
                }
            }
        }
        Err(StoreError::Exhausted {
            pool: pool.name.clone(),
            blocks: total,
        })
    }

    /// Guards of a lease creation: the pool is the version the block was
    /// chosen from, the schema is ours, and the block key is absent.
    fn lease_guards(&self, pool: &Pool, key: &str) -> Vec<Cmp> {
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
    fn release_txn(&self, lease: &BlockLease, extra: Vec<Cmp>) -> Txn {
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
            otherwise: vec![Op::get(key)],
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
        match r.kvs(0).first() {
            None => Err(StoreError::NotLeased { block: lease.block }),
            Some(kv) => {
                let cur = decode_lease(kv)?;
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
    pub async fn block(&self, block: IpNet) -> Result<(Pool, Option<BlockLease>)> {
        let pools = self.list_pools().await?;
        let pool = pools
            .into_iter()
            .find(|p| p.index_of(&block).is_some())
            .ok_or(StoreError::UnknownBlock { block })?;
        let lease = self
            .read_one("get block", self.keys.block(&pool.name, &block))
            .await?
            .as_ref()
            .map(decode_lease)
            .transpose()?;
        Ok((pool, lease))
    }

    /// Every leased block, in pool and address order.
    pub async fn all_blocks(&self) -> Result<Vec<BlockLease>> {
        self.read_prefix("list blocks", &self.keys.blocks())
            .await?
            .iter()
            .map(decode_lease)
            .collect()
    }

    /// The blocks leased by `node`.
    pub async fn node_blocks(&self, node: &str) -> Result<Vec<BlockLease>> {
        model::validate_node_name(node)?;
        Ok(self
            .all_blocks()
            .await?
            .into_iter()
            .filter(|l| l.node == node)
            .collect())
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

    // ------------------------------------------------------------ nodes

    /// Registers `rec` under a fresh lease of `ttl_secs`; returns the lease
    /// to keep alive with [`Store::keep_alive`].
    pub async fn register_node(&self, rec: &NodeRecord, ttl_secs: i64) -> Result<i64> {
        model::validate_node_name(&rec.node)?;
        let lease = self.backend.lease_grant(ttl_secs).await?;
        let txn = Txn {
            when: vec![],
            then: vec![Op::Put {
                key: self.keys.node(&rec.node).into_bytes(),
                value: encode(rec),
                lease,
            }],
            otherwise: vec![],
        };
        self.backend.txn("register node", txn).await?;
        Ok(lease)
    }

    /// Renews the liveness lease; false when it already expired (the node
    /// must register again).
    pub async fn keep_alive(&self, lease: i64) -> Result<bool> {
        Ok(self.backend.lease_keep_alive(lease).await? > 0)
    }

    /// Withdraws a node's liveness (clean shutdown).
    pub async fn deregister_node(&self, lease: i64) -> Result<()> {
        Ok(self.backend.lease_revoke(lease).await?)
    }

    /// The liveness record of `node`, if it is alive.
    pub async fn node(&self, node: &str) -> Result<Option<NodeRecord>> {
        self.read_one("get node", self.keys.node(node))
            .await?
            .as_ref()
            .map(decode)
            .transpose()
    }

    /// Every node that is alive or holds a block.
    pub async fn nodes(&self) -> Result<Vec<NodeStatus>> {
        let mut r = self
            .backend
            .txn(
                "list nodes",
                Txn::read(vec![
                    Op::prefix(&self.keys.nodes()),
                    Op::prefix(&self.keys.blocks()),
                ]),
            )
            .await?;
        let mut out: BTreeMap<String, NodeStatus> = BTreeMap::new();
        for kv in r.kvs(0) {
            let rec: NodeRecord = decode(&kv)?;
            out.insert(
                rec.node.clone(),
                NodeStatus {
                    node: rec.node,
                    alive: true,
                    boot_id: Some(rec.boot_id),
                    started_unix: Some(rec.started_unix),
                    blocks: 0,
                },
            );
        }
        for kv in r.kvs(1) {
            let l = decode_lease(&kv)?;
            out.entry(l.node.clone())
                .or_insert_with(|| NodeStatus {
                    node: l.node.clone(),
                    alive: false,
                    boot_id: None,
                    started_unix: None,
                    blocks: 0,
                })
                .blocks += 1;
        }
        Ok(out.into_values().collect())
    }

    // --------------------------------------------------------- controller

    /// Tries to become the controller leader: the leader key is created
    /// only if absent, bound to a fresh lease of `ttl_secs`. Returns the
    /// lease to keep alive when elected, None when another replica leads.
    pub async fn campaign(&self, identity: &str, ttl_secs: i64) -> Result<Option<i64>> {
        let lease = self.backend.lease_grant(ttl_secs).await?;
        let key = self.keys.leader();
        let txn = Txn {
            when: vec![Cmp::CreateRevision {
                key: key.clone().into_bytes(),
                op: CmpOp::Equal,
                rev: 0,
            }],
            then: vec![Op::Put {
                key: key.into_bytes(),
                value: identity.as_bytes().to_vec(),
                lease,
            }],
            otherwise: vec![],
        };
        if self.backend.txn("campaign", txn).await?.succeeded {
            Ok(Some(lease))
        } else {
            self.backend.lease_revoke(lease).await?;
            Ok(None)
        }
    }

    /// The current leader's identity.
    pub async fn leader(&self) -> Result<Option<String>> {
        Ok(self
            .read_one("get leader", self.keys.leader())
            .await?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }

    fn leader_guard(&self, identity: &str) -> Cmp {
        Cmp::ValueEquals {
            key: self.keys.leader().into_bytes(),
            value: identity.as_bytes().to_vec(),
        }
    }

    /// The controller's release of a dead node's block, fenced three ways
    /// in one transaction: the lease is still that incarnation, the node's
    /// liveness key is absent (it is not alive *now*), and `leader` still
    /// leads. So a node that came back, or a deposed leader, frees nothing.
    pub async fn release_dead_block(&self, lease: &BlockLease, leader: &str) -> Result<bool> {
        let txn = self.release_txn(
            lease,
            vec![
                Cmp::CreateRevision {
                    key: self.keys.node(&lease.node).into_bytes(),
                    op: CmpOp::Equal,
                    rev: 0,
                },
                self.leader_guard(leader),
            ],
        );
        Ok(self
            .backend
            .txn("release dead node's block", txn)
            .await?
            .succeeded)
    }

    /// Deletes address index entries whose block is not leased by the
    /// entry's node (garbage of a crashed mirror or a released block),
    /// fenced per entry and by leadership. Returns how many were deleted.
    pub async fn gc_address_index(&self, leader: &str) -> Result<usize> {
        let mut r = self
            .backend
            .txn(
                "read index and blocks",
                Txn::read(vec![
                    Op::prefix(&self.keys.addresses()),
                    Op::prefix(&self.keys.blocks()),
                ]),
            )
            .await?;
        let entries = r.kvs(0);
        let leases: Vec<BlockLease> = r.kvs(1).iter().map(decode_lease).collect::<Result<_>>()?;
        let mut deleted = 0;
        for kv in entries {
            let Ok(rec) = decode::<AddressRecord>(&kv) else {
                continue;
            };
            let owned = leases
                .iter()
                .any(|l| l.block.contains(&rec.address) && l.node == rec.node);
            if owned {
                continue;
            }
            let txn = Txn {
                when: vec![
                    Cmp::ModRevision {
                        key: kv.key.clone(),
                        op: CmpOp::Equal,
                        rev: kv.mod_revision,
                    },
                    self.leader_guard(leader),
                ],
                then: vec![Op::Delete {
                    key: kv.key.clone(),
                }],
                otherwise: vec![],
            };
            if self.backend.txn("gc address index", txn).await?.succeeded {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    // -------------------------------------------------- address index

    /// Records an address assignment in the index (coild mirrors its
    /// journal here asynchronously).
    pub async fn put_address(&self, rec: &AddressRecord) -> Result<()> {
        if !rec.block.contains(&rec.address) {
            return Err(StoreError::Invalid(format!(
                "address {} is outside its block {}",
                rec.address, rec.block
            )));
        }
        let txn = Txn {
            when: vec![self.schema_guard()],
            then: vec![Op::put(self.keys.address(rec.address), encode(rec))],
            otherwise: vec![],
        };
        let r = self.backend.txn("index address", txn).await?;
        if !r.succeeded {
            self.schema().await?;
            return Err(StoreError::corrupt(
                &self.keys.schema(),
                "schema key missing",
            ));
        }
        Ok(())
    }

    /// Removes an index entry, only if it still belongs to `rec`'s
    /// attachment (container id and ifname): a late delete of an old
    /// assignment never removes a newer one. Returns whether it deleted.
    pub async fn delete_address(&self, rec: &AddressRecord) -> Result<bool> {
        let key = self.keys.address(rec.address);
        for _ in 0..self.retry.attempts {
            let Some(kv) = self.read_one("unindex address", key.clone()).await? else {
                return Ok(false);
            };
            let cur: AddressRecord = decode(&kv)?;
            if cur.container_id != rec.container_id || cur.ifname != rec.ifname {
                return Ok(false);
            }
            let txn = Txn {
                when: vec![Cmp::ModRevision {
                    key: key.clone().into_bytes(),
                    op: CmpOp::Equal,
                    rev: kv.mod_revision,
                }],
                then: vec![Op::Delete {
                    key: key.clone().into_bytes(),
                }],
                otherwise: vec![],
            };
            if self.backend.txn("unindex address", txn).await?.succeeded {
                return Ok(true);
            }
        }
        Err(self.conflict("unindex address", &key))
    }

    /// Index entries inside `net`, in address order.
    pub async fn addresses_in(&self, net: &IpNet) -> Result<Vec<AddressRecord>> {
        let (a, b) = self.keys.address_range(net);
        let mut r = self
            .backend
            .txn("list addresses", Txn::read(vec![Op::range(a, b)]))
            .await?;
        r.kvs(0).iter().map(decode).collect()
    }

    /// Everything the store knows about one address.
    pub async fn address_info(&self, address: IpAddr) -> Result<AddressInfo> {
        let pools = self.list_pools().await?;
        let found = pools
            .iter()
            .find_map(|p| p.block_of(address).map(|b| (p.name.clone(), b)));
        let mut ops = vec![Op::get(self.keys.address(address))];
        if let Some((pool, block)) = &found {
            ops.push(Op::get(self.keys.block(pool, block)));
        }
        let mut r = self.backend.txn("address info", Txn::read(ops)).await?;
        let record = r.kvs(0).first().map(decode).transpose()?;
        let lease = r.kvs(1).first().map(decode_lease).transpose()?;
        Ok(AddressInfo {
            address,
            pool: found.as_ref().map(|f| f.0.clone()),
            block: found.map(|f| f.1),
            lease,
            record,
        })
    }
}

enum Scan {
    Free(u64, Pool),
    Changed(Pool),
}

/// The first free block index at or after `index` inside `subnet`, given
/// the (sorted, limited) leased keys from `index` on. None if every key of
/// the window is taken and the window reached its limit or the subnet's
/// end.
fn first_gap(
    pool: &Pool,
    pool_name: &str,
    keys: &Keys,
    index: u64,
    window: &[KeyValue],
) -> Option<u64> {
    let (_, last) = pool.subnet_span(index)?;
    let mut i = index;
    for kv in window {
        let (b, _) = pool.block_at(i)?;
        if kv.key.as_slice() != keys.block(pool_name, &b).as_bytes() {
            return Some(i);
        }
        i += 1;
        if i > last {
            return None;
        }
    }
    if (window.len() as i64) < PROBE_WINDOW {
        return Some(i);
    }
    None
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Values are JSON: readable with etcdctl, and stable for byte-exact
/// compares (serde_json writes struct fields in declaration order).
fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_else(|e| format!("{{\"unencodable\":\"{e}\"}}").into_bytes())
}

fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    serde_json::from_slice(&kv.value).map_err(|e| StoreError::corrupt(&kv.key_str(), e))
}

fn decode_pool(kv: &KeyValue) -> Result<Pool> {
    let mut p: Pool = decode(kv)?;
    p.revision = kv.mod_revision;
    if model::validate_pool_name(&p.name).is_err()
        || p.subnets.is_empty()
        || p.subnets
            .iter()
            .any(|s| model::validate_subnet(s, p.family, p.block_size).is_err())
    {
        return Err(StoreError::corrupt(
            &kv.key_str(),
            "pool record fails validation",
        ));
    }
    Ok(p)
}

fn decode_lease(kv: &KeyValue) -> Result<BlockLease> {
    let mut l: BlockLease = decode(kv)?;
    l.epoch = kv.create_revision;
    Ok(l)
}
