//! The cluster store: pools, subnets, fenced block leases, node liveness and
//! the address index.
//!
//! [`Store`] holds every rule (validation, overlap refusal, block choice,
//! fencing, bounded retry) and speaks to a [`Backend`]: etcd in a cluster,
//! or the node's journal for single-node use. The key layout is in
//! docs/etcd-schema.md.

pub mod any;
pub mod backend;
pub mod embedded;
mod error;
pub mod etcd;
pub mod model;
pub mod remote;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use ipnet::IpNet;
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use any::AnyBackend;
pub use backend::{Backend, BackendError, BackendErrorKind};
use backend::{Cmp, CmpOp, KeyValue, Op, Txn};
pub use error::StoreError;
use model::{find_overlap, schema_value, Keys, SchemaRecord, SCHEMA_VERSION};
pub use model::{
    AddressRecord, BadEntry, BlockLease, Family, Listing, NodeRecord, NodeStatus, Pool, PoolSpec,
    RemovalRecord, SubnetRecord, UnreachableRecord,
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
    /// Block entries deleted along with the pool (only with `force`),
    /// bad ones included.
    pub blocks_released: usize,
}

/// A pool with its leases, for `pool show`.
#[derive(Debug, Clone)]
pub struct PoolUsage {
    pub pool: Pool,
    pub leases: Vec<BlockLease>,
    /// Entries under the pool's `blocks/<pool>/` that failed validation:
    /// not counted as leases, but their keys are occupied.
    pub bad: Vec<BadEntry>,
}

/// Distinct bad entries remembered so each is logged at warn level once
/// (then at debug level); the memory is reset when it fills up.
const MAX_LOGGED_BAD: usize = 1024;

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
    /// Bad entries met by reads (each time one is skipped or refused).
    bad_seen: AtomicU64,
    /// Bad entries already logged at warn level (`key: reason`).
    bad_logged: Mutex<HashSet<String>>,
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
            bad_seen: AtomicU64::new(0),
            bad_logged: Mutex::new(HashSet::new()),
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
            bad_seen: AtomicU64::new(0),
            bad_logged: Mutex::new(HashSet::new()),
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

    /// How many times a read of this store met a bad entry (one that fails
    /// to decode or to validate against its key or pool) and skipped or
    /// refused it. It keeps growing while a bad entry stays in the store
    /// (every read that meets it counts), so its rate says "still there".
    pub fn bad_entries_seen(&self) -> u64 {
        self.bad_seen.load(Ordering::Relaxed)
    }

    /// Counts a bad entry that `op` met and skipped, and logs it.
    fn note_bad(&self, op: &str, bad: &BadEntry) {
        self.bad_seen.fetch_add(1, Ordering::Relaxed);
        self.log_bad(op, bad);
    }

    /// Logs a bad entry that `op` skipped: at warn level the first time,
    /// then at debug level, so periodic resyncs do not flood the log.
    fn log_bad(&self, op: &str, bad: &BadEntry) {
        let first = {
            let mut g = self.bad_logged.lock().unwrap_or_else(|e| e.into_inner());
            if g.len() >= MAX_LOGGED_BAD {
                g.clear();
            }
            g.insert(bad.to_string())
        };
        if first {
            tracing::warn!(
                op,
                key = %bad.key,
                reason = %bad.reason,
                "skipping a bad store entry; coil does not use, overwrite or delete it \
                 (see docs/etcd-schema.md, validation on read)"
            );
        } else {
            tracing::debug!(op, key = %bad.key, reason = %bad.reason, "skipping a bad store entry");
        }
    }

    /// Counts `bad` and turns it into the error a single-key read returns
    /// for it (the caller decides whether to log it).
    fn refuse(&self, bad: BadEntry) -> StoreError {
        self.bad_seen.fetch_add(1, Ordering::Relaxed);
        StoreError::Corrupt {
            key: bad.key,
            reason: bad.reason,
        }
    }

    /// Splits `kvs` into the entries `read` accepts and the bad ones,
    /// counting the bad ones. The `*_checked` listings return them for the
    /// caller to show; the plain listings log them through [`Self::logged`].
    fn sift<T>(
        &self,
        kvs: &[KeyValue],
        read: impl Fn(&KeyValue) -> std::result::Result<T, BadEntry>,
    ) -> Listing<T> {
        let l = partition(kvs, read);
        self.bad_seen
            .fetch_add(l.bad.len() as u64, Ordering::Relaxed);
        l
    }

    /// The good items of a listing, after logging its bad entries.
    fn logged<T>(&self, op: &str, l: Listing<T>) -> Vec<T> {
        for b in &l.bad {
            self.log_bad(op, b);
        }
        l.items
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
        model::validate_spec(spec)?;
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
        for attempt in 0..self.retry.attempts {
            self.backoff(attempt).await;
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
    fn registry_unchanged(&self, rev: i64) -> Cmp {
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
        for attempt in 0..self.retry.attempts {
            self.backoff(attempt).await;
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
                Some(kv) if kv.mod_revision != pool.revision => continue,
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
                return Ok(RemovedPool {
                    pool: name.to_string(),
                    blocks_released: entries,
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
                None => rand::thread_rng().gen_range(range),
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
    async fn scan_for_free(&self, pool: &Pool, family: Family) -> Result<Scan> {
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
        let start = rand::thread_rng().gen_range(0..total);
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
    fn not_removed(&self, node: &str) -> Cmp {
        Cmp::CreateRevision {
            key: self.keys.removed(node).into_bytes(),
            op: CmpOp::Equal,
            rev: 0,
        }
    }

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

    /// The liveness record of `node`, if it is alive;
    /// [`StoreError::Corrupt`] if its entry is bad.
    pub async fn node(&self, node: &str) -> Result<Option<NodeRecord>> {
        match self.read_one("get node", self.keys.node(node)).await? {
            None => Ok(None),
            Some(kv) => read_node(&self.keys, &kv)
                .map(Some)
                .map_err(|b| self.refuse(b)),
        }
    }

    /// Every node that is alive or holds a valid lease (bad entries are
    /// skipped, counted and logged).
    pub async fn nodes(&self) -> Result<Vec<NodeStatus>> {
        Ok(self.logged("list nodes", self.nodes_checked().await?))
    }

    /// Every node that is alive or holds a valid lease, and the bad entries
    /// under `nodes/` and `blocks/`. A node whose liveness entry is bad is
    /// not listed as alive (its key still fences the controller off its
    /// blocks: the controller frees blocks only of nodes without one).
    pub async fn nodes_checked(&self) -> Result<Listing<NodeStatus>> {
        let mut r = self
            .backend
            .txn(
                "list nodes",
                Txn::read(vec![
                    Op::prefix(&self.keys.nodes()),
                    Op::prefix(&self.keys.blocks()),
                    Op::prefix(&self.keys.pools()),
                    Op::prefix(&self.keys.removed_prefix()),
                    Op::prefix(&self.keys.unreachable_prefix()),
                ]),
            )
            .await?;
        let pools = pools_by_name(&self.keys, &r.kvs(2));
        let removed = self.sift(&r.kvs(3), |kv| {
            read_keyed::<RemovalRecord>(kv, &self.keys.removed_prefix(), |v| &v.node)
        });
        let unreachable = self.sift(&r.kvs(4), |kv| {
            read_keyed::<UnreachableRecord>(kv, &self.keys.unreachable_prefix(), |v| &v.node)
        });
        let records = self.sift(&r.kvs(0), |kv| read_node(&self.keys, kv));
        let leases = self.sift(&r.kvs(1), |kv| read_lease_in(&self.keys, kv, &pools));
        let mut out: BTreeMap<String, NodeStatus> = BTreeMap::new();
        for rec in records.items {
            out.insert(
                rec.node.clone(),
                NodeStatus {
                    node: rec.node,
                    alive: true,
                    boot_id: Some(rec.boot_id),
                    started_unix: Some(rec.started_unix),
                    blocks: 0,
                    unreachable_since: None,
                    removed: None,
                },
            );
        }
        for l in leases.items {
            out.entry(l.node.clone())
                .or_insert_with(|| NodeStatus::gone(&l.node))
                .blocks += 1;
        }
        for u in unreachable.items {
            if let Some(n) = out.get_mut(&u.node) {
                if !n.alive {
                    n.unreachable_since = Some(u.since_unix);
                }
            }
        }
        for rm in removed.items {
            let node = rm.node.clone();
            out.entry(node.clone())
                .or_insert_with(|| NodeStatus::gone(&node))
                .removed = Some(rm);
        }
        let mut bad = records.bad;
        bad.extend(leases.bad);
        bad.extend(removed.bad);
        bad.extend(unreachable.bad);
        Ok(Listing {
            items: out.into_values().collect(),
            bad,
        })
    }

    // ------------------------------------------------- removal and fences

    /// The node's removal fence, if it has one.
    pub async fn removal(&self, node: &str) -> Result<Option<RemovalRecord>> {
        model::validate_node_name(node)?;
        let key = self.keys.removed(node);
        let mut r = self
            .backend
            .txn("read removal fence", Txn::read(vec![Op::get(key.clone())]))
            .await?;
        match r.kvs(0).first() {
            None => Ok(None),
            Some(kv) => read_keyed::<RemovalRecord>(kv, &self.keys.removed_prefix(), |v| &v.node)
                .map(Some)
                .map_err(|b| self.refuse(b)),
        }
    }

    /// Removes a node from the cluster on proof that its pods are gone (an
    /// operator's word, or its Kubernetes Node deleted): in one transaction
    /// it records the node's removal fence and frees every block the node
    /// leases, each fenced on its incarnation (create revision and value),
    /// on the node's liveness key being absent unless `force`, and on
    /// `leader` still leading when the controller does it. The fence keeps
    /// the node from leasing anything, and its coild from serving its old
    /// blocks, until `readmit_node`. Idempotent: a removed node is removed
    /// again with whatever it holds now.
    pub async fn remove_node(
        &self,
        node: &str,
        reason: &str,
        force: bool,
        leader: Option<&str>,
    ) -> Result<RemovalRecord> {
        model::validate_node_name(node)?;
        for attempt in 0..self.retry.attempts {
            self.backoff(attempt).await;
            let mut r = self
                .backend
                .txn(
                    "read node for removal",
                    Txn::read(vec![
                        Op::get(self.keys.node(node)),
                        Op::prefix(&self.keys.blocks()),
                        Op::prefix(&self.keys.pools()),
                    ]),
                )
                .await?;
            let alive = !r.kvs(0).is_empty();
            if alive && !force {
                return Err(StoreError::NodeAlive {
                    node: node.to_string(),
                });
            }
            let pools = pools_by_name(&self.keys, &r.kvs(2));
            let listed = self.sift(&r.kvs(1), |kv| read_lease_in(&self.keys, kv, &pools));
            for b in &listed.bad {
                self.log_bad("remove node", b);
            }
            let mine: Vec<BlockLease> = listed
                .items
                .into_iter()
                .filter(|l| l.node == node)
                .collect();
            let rec = RemovalRecord {
                node: node.to_string(),
                removed_unix: now_unix(),
                reason: reason.to_string(),
                blocks: mine.iter().map(|l| l.block).collect(),
            };
            let mut when = vec![self.schema_guard()];
            if !force {
                when.push(Cmp::CreateRevision {
                    key: self.keys.node(node).into_bytes(),
                    op: CmpOp::Equal,
                    rev: 0,
                });
            }
            if let Some(l) = leader {
                when.push(self.leader_guard(l));
            }
            let mut then = vec![
                Op::put(self.keys.removed(node), encode(&rec)),
                Op::Delete {
                    key: self.keys.unreachable(node).into_bytes(),
                },
            ];
            for l in &mine {
                let t = self.release_txn(l, vec![]);
                when.extend(t.when.into_iter().filter(|c| {
                    !matches!(c, Cmp::ValueEquals { key, .. } if key == &self.keys.schema().into_bytes())
                }));
                then.extend(t.then);
            }
            let txn = Txn {
                when,
                then,
                otherwise: vec![],
            };
            if self.backend.txn("remove node", txn).await?.succeeded {
                return Ok(rec);
            }
            if let Some(l) = leader {
                if self.leader().await?.as_deref() != Some(l) {
                    return Err(StoreError::Invalid(format!(
                        "{l} no longer leads the controller"
                    )));
                }
            }
        }
        Err(self.conflict("remove node", &self.keys.removed(node)))
    }

    /// Lifts a node's removal fence (`coilctl node readmit`): the node may
    /// lease blocks again. Its coild drops the quarantined old blocks once
    /// their pods are gone. Refused while the node still holds a block (it
    /// cannot, unless a lease predates the fence).
    pub async fn readmit_node(&self, node: &str) -> Result<bool> {
        model::validate_node_name(node)?;
        let held = self.node_blocks(node).await?;
        if !held.is_empty() {
            return Err(StoreError::Invalid(format!(
                "node {node} still holds {} block(s); remove it again first",
                held.len()
            )));
        }
        let key = self.keys.removed(node);
        let txn = Txn {
            when: vec![self.schema_guard()],
            then: vec![Op::Delete {
                key: key.into_bytes(),
            }],
            otherwise: vec![],
        };
        let mut r = self.backend.txn("readmit node", txn).await?;
        Ok(matches!(r.results.first_mut(), Some(backend::OpResult::Deleted(n)) if *n > 0))
    }

    /// The controller notes that `node` (holding blocks) has no liveness
    /// since `since_unix`, once; fenced on leadership and on the node
    /// still being without liveness.
    pub async fn note_unreachable(&self, node: &str, since_unix: u64, leader: &str) -> Result<()> {
        let rec = UnreachableRecord {
            node: node.to_string(),
            since_unix,
        };
        let key = self.keys.unreachable(node);
        let txn = Txn {
            when: vec![
                self.leader_guard(leader),
                Cmp::CreateRevision {
                    key: key.clone().into_bytes(),
                    op: CmpOp::Equal,
                    rev: 0,
                },
                Cmp::CreateRevision {
                    key: self.keys.node(node).into_bytes(),
                    op: CmpOp::Equal,
                    rev: 0,
                },
            ],
            then: vec![Op::put(key, encode(&rec))],
            otherwise: vec![],
        };
        self.backend.txn("note unreachable node", txn).await?;
        Ok(())
    }

    /// The controller clears the note of a node that is back (or gone).
    pub async fn clear_unreachable(&self, node: &str, leader: &str) -> Result<()> {
        let txn = Txn {
            when: vec![self.leader_guard(leader)],
            then: vec![Op::Delete {
                key: self.keys.unreachable(node).into_bytes(),
            }],
            otherwise: vec![],
        };
        self.backend.txn("clear unreachable note", txn).await?;
        Ok(())
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

    /// Deletes address index entries whose block is not leased by the
    /// entry's node (garbage of a crashed mirror or a released block),
    /// fenced per entry and by leadership. Returns how many were deleted.
    pub async fn gc_address_index(&self, leader: &str) -> Result<usize> {
        let mut from = Vec::new();
        let mut deleted = 0;
        loop {
            let (n, next) = self
                .gc_address_index_pages(leader, &from, usize::MAX)
                .await?;
            deleted += n;
            match next {
                Some(k) => from = k,
                None => return Ok(deleted),
            }
        }
    }

    /// [`Store::gc_address_index`] over at most `pages` pages of the index
    /// from key `from` (empty: its start): returns the entries deleted and
    /// where to go on (None once the end is reached). The controller sweeps
    /// the index a few pages per pass, so a pass costs the same at 150,000
    /// pods as at 1,500.
    pub async fn gc_address_index_pages(
        &self,
        leader: &str,
        from: &[u8],
        pages: usize,
    ) -> Result<(usize, Option<Vec<u8>>)> {
        // The leases first, at revision R. The index is then read in pages
        // (one read of all of it outgrows gRPC's 4 MiB answers at about
        // 15,000 pods), and only entries written at or before R are judged
        // against the leases of R: an entry written later may belong to a
        // block leased after R. An entry stale at R stays stale unless it
        // is written again, and every delete is fenced on the entry's mod
        // revision (and on leadership).
        let mut r = self
            .backend
            .txn(
                "read blocks for index gc",
                Txn::read(vec![
                    Op::prefix(&self.keys.blocks()),
                    Op::prefix(&self.keys.pools()),
                ]),
            )
            .await?;
        let snapshot = r.revision;
        let pools = pools_by_name(&self.keys, &r.kvs(1));
        let listed = self.sift(&r.kvs(0), |kv| read_lease_in(&self.keys, kv, &pools));
        for b in &listed.bad {
            self.log_bad("gc address index", b);
        }
        // A bad block entry may be the lease of addresses in use: the index
        // entries of its pool are left alone while it is there, and all of
        // them if its key does not even name a pool.
        let mut shielded: BTreeSet<String> = BTreeSet::new();
        for b in &listed.bad {
            match self.keys.split_block_key(&b.key) {
                Some((pool, _)) => {
                    shielded.insert(pool.to_string());
                }
                None => {
                    tracing::warn!(key = %b.key, "bad block entry of no pool: the address index is not garbage-collected while it is there");
                    return Ok((0, None));
                }
            }
        }
        // Leases by block start: the block holding an address is the one
        // starting at or before it (blocks never overlap).
        let by_start: BTreeMap<IpAddr, BlockLease> = listed
            .items
            .into_iter()
            .map(|l| (l.block.network(), l))
            .collect();
        let owned = |rec: &AddressRecord| {
            by_start
                .range(..=rec.address)
                .next_back()
                .is_some_and(|(_, l)| l.block.contains(&rec.address) && l.node == rec.node)
        };
        let prefix = self.keys.addresses();
        let end = backend::prefix_end(prefix.as_bytes());
        let mut cursor = if from.starts_with(prefix.as_bytes()) {
            from.to_vec()
        } else {
            prefix.as_bytes().to_vec()
        };
        let mut deleted = 0;
        let mut read = 0;
        loop {
            if read == pages {
                return Ok((deleted, Some(cursor)));
            }
            read += 1;
            let mut page = self
                .backend
                .txn(
                    "read index page",
                    Txn::read(vec![Op::Range {
                        start: cursor.clone(),
                        end: end.clone(),
                        limit: INDEX_PAGE,
                        keys_only: false,
                    }]),
                )
                .await?;
            let entries = page.kvs(0);
            let full = entries.len() as i64 >= INDEX_PAGE;
            if let Some(last) = entries.last() {
                cursor = last.key.clone();
                cursor.push(0);
            }
            for kv in entries {
                if kv.mod_revision > snapshot {
                    continue;
                }
                // A bad index entry is skipped, never deleted.
                let rec = match read_address(&self.keys, &kv) {
                    Ok(rec) => rec,
                    Err(b) => {
                        self.note_bad("gc address index", &b);
                        continue;
                    }
                };
                if shielded.contains(rec.pool.as_str()) || owned(&rec) {
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
            if !full {
                return Ok((deleted, None));
            }
        }
    }

    // -------------------------------------------------- address index

    /// Records an address assignment in the index (coild mirrors its
    /// journal here asynchronously). A record that reads would refuse is
    /// refused here. It replaces a valid entry (a newer assignment wins),
    /// but never a bad one: that is [`StoreError::Corrupt`], and the entry
    /// stays for an administrator to look at.
    pub async fn put_address(&self, rec: &AddressRecord) -> Result<()> {
        let key = self.keys.address(rec.address);
        model::validate_address_entry(&self.keys, &key, rec)
            .map_err(|r| StoreError::Invalid(format!("address record {}: {r}", rec.address)))?;
        let value = encode(rec);
        // First try: the key is absent (one request in the common case).
        let mut fence = Cmp::CreateRevision {
            key: key.clone().into_bytes(),
            op: CmpOp::Equal,
            rev: 0,
        };
        for attempt in 0..self.retry.attempts {
            self.backoff(attempt.saturating_sub(1)).await;
            let txn = Txn {
                when: vec![self.schema_guard(), fence],
                then: vec![Op::put(key.clone(), value.clone())],
                otherwise: vec![Op::get(key.clone()), Op::get(self.keys.schema())],
            };
            let mut r = self.backend.txn("index address", txn).await?;
            if r.succeeded {
                return Ok(());
            }
            let (cur, schema) = (r.kvs(0), r.kvs(1));
            if schema.first().map(|kv| kv.value.as_slice()) != Some(schema_value().as_slice()) {
                self.schema().await?;
                return Err(StoreError::corrupt(
                    &self.keys.schema(),
                    "schema key missing",
                ));
            }
            fence = match cur.first() {
                None => Cmp::CreateRevision {
                    key: key.clone().into_bytes(),
                    op: CmpOp::Equal,
                    rev: 0,
                },
                Some(kv) => {
                    read_address(&self.keys, kv).map_err(|b| self.refuse(b))?;
                    if kv.value == value {
                        return Ok(());
                    }
                    Cmp::ModRevision {
                        key: key.clone().into_bytes(),
                        op: CmpOp::Equal,
                        rev: kv.mod_revision,
                    }
                }
            };
        }
        Err(self.conflict("index address", &key))
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
            // A bad entry is refused, never deleted.
            let cur = read_address(&self.keys, &kv).map_err(|b| self.refuse(b))?;
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

    /// Valid index entries inside `net`, in address order (bad entries are
    /// skipped, counted and logged).
    pub async fn addresses_in(&self, net: &IpNet) -> Result<Vec<AddressRecord>> {
        Ok(self.logged("list addresses", self.addresses_in_checked(net).await?))
    }

    /// Valid index entries inside `net`, in address order, and the bad
    /// entries in that range.
    pub async fn addresses_in_checked(&self, net: &IpNet) -> Result<Listing<AddressRecord>> {
        let (a, b) = self.keys.address_range(net);
        let mut r = self
            .backend
            .txn("list addresses", Txn::read(vec![Op::range(a, b)]))
            .await?;
        Ok(self.sift(&r.kvs(0), |kv| read_address(&self.keys, kv)))
    }

    /// Everything the store knows about one address;
    /// [`StoreError::Corrupt`] if its index entry or its block's entry is
    /// bad.
    pub async fn address_info(&self, address: IpAddr) -> Result<AddressInfo> {
        let pools = self.list_pools().await?;
        let found = pools
            .iter()
            .find_map(|p| p.block_of(address).map(|b| (p, b)));
        let mut ops = vec![Op::get(self.keys.address(address))];
        if let Some((pool, block)) = &found {
            ops.push(Op::get(self.keys.block(&pool.name, block)));
        }
        let mut r = self.backend.txn("address info", Txn::read(ops)).await?;
        let (record, lease) = (r.kvs(0), r.kvs(1));
        let record = match record.first() {
            None => None,
            Some(kv) => Some(read_address(&self.keys, kv).map_err(|b| self.refuse(b))?),
        };
        let lease = match lease.first() {
            None => None,
            Some(kv) => Some(
                read_lease(&self.keys, kv, found.as_ref().map(|f| f.0))
                    .map_err(|b| self.refuse(b))?,
            ),
        };
        Ok(AddressInfo {
            address,
            pool: found.as_ref().map(|f| f.0.name.clone()),
            block: found.map(|f| f.1),
            lease,
            record,
        })
    }

    // ------------------------------------------------------------ check

    /// Every bad entry under the prefix, read at one revision: values that
    /// fail to decode or to validate against their key (and pool), keys
    /// outside coil's layout, and pools and subnet registry entries that
    /// disagree with each other. Changes nothing (`coilctl store check`).
    pub async fn check(&self) -> Result<Vec<BadEntry>> {
        let kvs = self.read_prefix("check store", self.keys.prefix()).await?;
        let by_key: HashMap<String, &KeyValue> = kvs.iter().map(|kv| (kv.key_str(), kv)).collect();
        let pool_kvs: Vec<KeyValue> = kvs
            .iter()
            .filter(|kv| kv.key.starts_with(self.keys.pools().as_bytes()))
            .cloned()
            .collect();
        let pools = pools_by_name(&self.keys, &pool_kvs);
        let registered = |s: &IpNet| {
            by_key
                .get(&self.keys.subnet(s))
                .and_then(|kv| read_subnet(&self.keys, kv).ok())
        };
        let mut bad = Vec::new();
        for kv in &kvs {
            let key = kv.key_str();
            let rest = key.strip_prefix(self.keys.prefix()).unwrap_or(&key);
            let verdict: std::result::Result<(), BadEntry> = if rest == "schema" {
                if kv.value == schema_value() {
                    Ok(())
                } else {
                    Err(bad_entry(
                        kv,
                        format!(
                            "schema value {:?} is not the {:?} this coil writes and fences on",
                            String::from_utf8_lossy(&kv.value),
                            String::from_utf8_lossy(&schema_value())
                        ),
                    ))
                }
            } else if rest.starts_with("pools/") {
                read_pool(&self.keys, kv).and_then(|p| {
                    for s in p.all_subnets() {
                        match registered(s) {
                            Some(r) if r.pool == p.name => {}
                            Some(r) => {
                                return Err(bad_entry(
                                    kv,
                                    format!("subnet {s} is registered to pool {}", r.pool),
                                ))
                            }
                            None => {
                                return Err(bad_entry(
                                    kv,
                                    format!(
                                        "subnet {s} has no valid entry {} in the subnet registry, \
                                         so overlap checks cannot see it",
                                        self.keys.subnet(s)
                                    ),
                                ))
                            }
                        }
                    }
                    Ok(())
                })
            } else if rest.starts_with("subnets/") {
                read_subnet(&self.keys, kv).and_then(|r| {
                    match pools.get(&r.pool) {
                        Some(p) if p.all_subnets().any(|s| *s == r.subnet) => Ok(()),
                        _ => Err(bad_entry(
                            kv,
                            format!(
                                "registered to pool {}, which does not exist, is bad or does not list {}",
                                r.pool, r.subnet
                            ),
                        )),
                    }
                })
            } else if rest.starts_with("blocks/") {
                read_lease_in(&self.keys, kv, &pools).map(|_| ())
            } else if rest.starts_with("nodes/") {
                read_node(&self.keys, kv).map(|_| ())
            } else if rest.starts_with("addresses/") {
                read_address(&self.keys, kv).map(|_| ())
            } else if key == self.keys.leader() {
                Ok(())
            } else {
                Err(bad_entry(kv, "not a key of coil's layout".into()))
            };
            if let Err(b) = verdict {
                bad.push(b);
            }
        }
        self.bad_seen.fetch_add(bad.len() as u64, Ordering::Relaxed);
        Ok(bad)
    }
}

enum Scan {
    Free(u64, Pool),
    Changed(Pool),
}

/// The first free block index at or after `index` inside `subnet`, given
/// the (sorted, limited) leased keys from `index` on. None if every key of
/// the window is taken and the window reached its limit or the subnet's
/// end. A key is taken whatever its value (a bad entry occupies its
/// block); a stray key that is no block key of the pool sorts between two
/// block keys and occupies neither.
fn first_gap(
    pool: &Pool,
    pool_name: &str,
    keys: &Keys,
    index: u64,
    window: &[KeyValue],
) -> Option<u64> {
    let (_, last) = pool.subnet_span(index)?;
    let mut i = index;
    let mut want = keys.block(pool_name, &pool.block_at(i)?.0);
    for kv in window {
        let k = kv.key.as_slice();
        if k < want.as_bytes() {
            continue;
        }
        if k != want.as_bytes() {
            return Some(i);
        }
        i += 1;
        if i > last {
            return None;
        }
        want = keys.block(pool_name, &pool.block_at(i)?.0);
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

/// A bad entry for `kv`.
fn bad_entry(kv: &KeyValue, reason: String) -> BadEntry {
    BadEntry {
        key: kv.key_str(),
        reason,
    }
}

/// Decodes a JSON value, or says why it is not a `what`.
fn parse<T: DeserializeOwned>(kv: &KeyValue, what: &str) -> std::result::Result<T, BadEntry> {
    serde_json::from_slice(&kv.value)
        .map_err(|e| bad_entry(kv, format!("not a valid {what} value: {e}")))
}

/// Splits `kvs` into the entries `read` accepts and the bad ones.
fn partition<T>(
    kvs: &[KeyValue],
    read: impl Fn(&KeyValue) -> std::result::Result<T, BadEntry>,
) -> Listing<T> {
    let mut l = Listing::default();
    for kv in kvs {
        match read(kv) {
            Ok(v) => l.items.push(v),
            Err(b) => l.bad.push(b),
        }
    }
    l
}

/// A pool entry (`pools/<name>`), validated against its key.
fn read_pool(keys: &Keys, kv: &KeyValue) -> std::result::Result<Pool, BadEntry> {
    let mut p: Pool = parse(kv, "pool")?;
    p.revision = kv.mod_revision;
    model::validate_pool_entry(keys, &kv.key_str(), &p).map_err(|r| bad_entry(kv, r))?;
    Ok(p)
}

/// The valid pools among `kvs`, by name (bad ones are left out: a lease of
/// a pool whose entry is bad cannot be validated, so it is bad too).
/// Address index entries read per page by [`Store::gc_address_index`]
/// (about 250 bytes each: well under gRPC's 4 MiB answers).
const INDEX_PAGE: i64 = 2000;

/// Blocks one [`Store::node_view`] reads at most (etcd's default limit is
/// 128 operations per transaction; two go to the pools and the fence).
pub const NODE_VIEW_MAX_BLOCKS: usize = 120;

/// See [`Store::node_view`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// The store's valid leases of the blocks asked for (whoever holds them).
    pub leases: Vec<BlockLease>,
    /// The node has a removal fence (or a malformed one).
    pub removed: bool,
}

fn pools_by_name(keys: &Keys, kvs: &[KeyValue]) -> HashMap<String, Pool> {
    kvs.iter()
        .filter_map(|kv| read_pool(keys, kv).ok())
        .map(|p| (p.name.clone(), p))
        .collect()
}

/// A lease entry (`blocks/<pool>/<hex>`), validated against its key and
/// `pool` (the valid pool the key names, if there is one).
fn read_lease(
    keys: &Keys,
    kv: &KeyValue,
    pool: Option<&Pool>,
) -> std::result::Result<BlockLease, BadEntry> {
    let mut l: BlockLease = parse(kv, "block lease")?;
    l.epoch = kv.create_revision;
    model::validate_lease(keys, &kv.key_str(), &l, pool).map_err(|r| bad_entry(kv, r))?;
    Ok(l)
}

/// A lease entry validated against the pool its key names, looked up in
/// `pools`.
fn read_lease_in(
    keys: &Keys,
    kv: &KeyValue,
    pools: &HashMap<String, Pool>,
) -> std::result::Result<BlockLease, BadEntry> {
    let key = kv.key_str();
    let pool = keys
        .split_block_key(&key)
        .and_then(|(name, _)| pools.get(name));
    read_lease(keys, kv, pool)
}

/// A liveness entry (`nodes/<node>`), validated against its key.
/// Decodes a record stored under `prefix<name>` whose value names itself
/// (`name_of`); the name must match the key's.
fn read_keyed<T: DeserializeOwned>(
    kv: &KeyValue,
    prefix: &str,
    name_of: impl Fn(&T) -> &String,
) -> std::result::Result<T, BadEntry> {
    let key = kv.key_str();
    let bad = |reason: String| BadEntry {
        key: key.clone(),
        reason,
    };
    let v: T = serde_json::from_slice(&kv.value).map_err(|e| bad(format!("undecodable: {e}")))?;
    let name = key.strip_prefix(prefix).unwrap_or("");
    if name_of(&v) != name || model::validate_node_name(name).is_err() {
        return Err(bad(format!(
            "names {:?}, not its key's {name:?}",
            name_of(&v)
        )));
    }
    Ok(v)
}

fn read_node(keys: &Keys, kv: &KeyValue) -> std::result::Result<NodeRecord, BadEntry> {
    let rec: NodeRecord = parse(kv, "node record")?;
    model::validate_node_entry(keys, &kv.key_str(), &rec).map_err(|r| bad_entry(kv, r))?;
    Ok(rec)
}

/// An address index entry (`addresses/<fam>/<hex>`), validated against its
/// key.
fn read_address(keys: &Keys, kv: &KeyValue) -> std::result::Result<AddressRecord, BadEntry> {
    let rec: AddressRecord = parse(kv, "address record")?;
    model::validate_address_entry(keys, &kv.key_str(), &rec).map_err(|r| bad_entry(kv, r))?;
    Ok(rec)
}

/// A subnet registry entry (`subnets/...`), validated against its key.
fn read_subnet(keys: &Keys, kv: &KeyValue) -> std::result::Result<SubnetRecord, BadEntry> {
    let rec: SubnetRecord = parse(kv, "subnet registry")?;
    model::validate_subnet_entry(keys, &kv.key_str(), &rec).map_err(|r| bad_entry(kv, r))?;
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Pool {
        Pool {
            name: "p".into(),
            family: Family::Ipv4,
            block_size: 4,
            subnets: vec!["10.0.0.0/24".parse().expect("net")],
            created_unix: 0,
            revision: 1,
            ipv6: None,
        }
    }

    fn kv(key: String) -> KeyValue {
        KeyValue {
            key: key.into_bytes(),
            value: b"garbage".to_vec(),
            create_revision: 1,
            mod_revision: 1,
            lease: 0,
        }
    }

    fn block_key(k: &Keys, p: &Pool, i: u64) -> String {
        k.block(&p.name, &p.block_at(i).expect("block").0)
    }

    #[test]
    fn first_gap_treats_every_block_key_as_taken_and_strays_as_nothing() {
        let k = Keys::new("/coil/").expect("keys");
        let p = pool();
        // Blocks 2 and 3 are occupied (whatever their values); stray keys
        // (a misaligned block, a suffixed key) sit between them: block 3
        // is still taken, block 4 is the gap.
        let k3 = block_key(&k, &p, 3);
        let misaligned = format!("{}1", &k3[..k3.len() - 1]);
        let window = vec![
            kv(block_key(&k, &p, 2)),
            kv(format!("{}x", block_key(&k, &p, 2))),
            kv(k3.clone()),
            kv(misaligned),
        ];
        assert_eq!(first_gap(&p, "p", &k, 2, &window), Some(4));
        // A stray after a free block does not hide the gap.
        let window = vec![
            kv(block_key(&k, &p, 2)),
            kv(format!("{}x", block_key(&k, &p, 2))),
        ];
        assert_eq!(first_gap(&p, "p", &k, 2, &window), Some(3));
        // Up to the subnet's end everything is taken.
        let window: Vec<KeyValue> = (10..16).map(|i| kv(block_key(&k, &p, i))).collect();
        assert_eq!(first_gap(&p, "p", &k, 10, &window), None);
    }
}
