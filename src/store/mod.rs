//! The cluster store: pools, subnets, fenced block leases, node liveness and
//! the address index.
//!
//! [`Store`] holds every rule (validation, overlap refusal, block choice,
//! fencing, bounded retry) and speaks to a [`Backend`]: etcd in a cluster,
//! or the node's journal for single-node use. The key layout is in
//! docs/etcd-schema.md.

pub mod backend;
mod blocks;
mod check;
mod controller;
pub mod embedded;
mod error;
mod index;
pub mod model;
mod nodes;
mod pools;
pub mod rpc;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Where block choice and backoff jitter draw from: the thread's
    /// generator, or a seeded one (`with_seed`, for simulations that must
    /// replay the same addresses).
    rng: Mutex<Option<rand::rngs::StdRng>>,
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
            rng: Mutex::new(None),
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
            rng: Mutex::new(None),
        })
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Draws block choices and backoff jitter from a generator seeded with
    /// `seed` instead of the thread's: a simulation then replays the same
    /// addresses.
    pub fn with_seed(self, seed: u64) -> Self {
        use rand::SeedableRng;
        *self.rng.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(rand::rngs::StdRng::seed_from_u64(seed));
        self
    }

    /// A uniform draw from `range` (see [`Store::with_seed`]).
    fn draw<T, R>(&self, range: R) -> T
    where
        T: rand::distributions::uniform::SampleUniform,
        R: rand::distributions::uniform::SampleRange<T>,
    {
        match self.rng.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            Some(r) => r.gen_range(range),
            None => rand::thread_rng().gen_range(range),
        }
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
        let jitter = self.draw(0..=cap.as_micros() as u64);
        tokio::time::sleep(Duration::from_micros(jitter)).await;
    }

    /// The store's one retry loop for optimistic transactions: runs
    /// `attempt` until it is [`Try::Done`] or fails, at most
    /// `retry.attempts` times, backing off (doubling, jittered) before
    /// every try but the first; then [`StoreError::Conflict`] naming `op`
    /// and `key`. A try reads, decides, and sends one transaction fenced
    /// on what it read; [`Try::Lost`] means the fence failed (someone
    /// wrote in between) and the decision must be made again.
    async fn optimistic<T, F, Fut>(&self, op: &str, key: &str, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Try<T>>>,
    {
        for n in 0..self.retry.attempts {
            self.backoff(n).await;
            if let Try::Done(v) = attempt().await? {
                return Ok(v);
            }
        }
        Err(self.conflict(op, key))
    }

    fn conflict(&self, op: &str, key: &str) -> StoreError {
        StoreError::Conflict {
            op: op.to_string(),
            key: key.to_string(),
            attempts: self.retry.attempts,
        }
    }
}

/// What one try of an optimistic transaction came to (see
/// `Store::optimistic`).
enum Try<T> {
    Done(T),
    /// The transaction's fence failed: read and decide again.
    Lost,
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
