//! The embedded adapter: the cluster store kept in the node's own journal,
//! for a single host (podman, a one-node cluster, the quickstart) with no
//! etcd at all.
//!
//! It gives the same guarantees the [`Backend`] trait promises etcd does:
//! every transaction is evaluated and applied under one lock and committed
//! as one durable journal batch, revisions grow by one per writing
//! transaction, and leases expire by wall clock. Only one process owns it
//! (the journal's lock file enforces that): coild in embedded mode, or
//! coilctl when coild is stopped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use coil_journal::{Batch, Journal, JournalError};
use serde::{Deserialize, Serialize};

use super::backend::{
    Backend, BackendError, BackendErrorKind, Cmp, KeyValue, Op, OpResult, Txn, TxnResult,
};

/// Keys below this byte are the adapter's own bookkeeping; user keys must
/// not start with it.
const META: u8 = 0;
const META_REVISION: &[u8] = b"\0revision";
const META_LEASE: &[u8] = b"\0lease/";
const HEADER: usize = 24;

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct LeaseRec {
    ttl: i64,
    expires_ms: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    create: i64,
    modified: i64,
    lease: i64,
    value: Vec<u8>,
}

impl Entry {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER + self.value.len());
        v.extend_from_slice(&self.create.to_be_bytes());
        v.extend_from_slice(&self.modified.to_be_bytes());
        v.extend_from_slice(&self.lease.to_be_bytes());
        v.extend_from_slice(&self.value);
        v
    }

    fn decode(b: &[u8]) -> Option<Entry> {
        if b.len() < HEADER {
            return None;
        }
        let n =
            |i: usize| -> Option<i64> { Some(i64::from_be_bytes(b[i..i + 8].try_into().ok()?)) };
        Some(Entry {
            create: n(0)?,
            modified: n(8)?,
            lease: n(16)?,
            value: b[HEADER..].to_vec(),
        })
    }

    fn kv(&self, key: &[u8], keys_only: bool) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: if keys_only {
                Vec::new()
            } else {
                self.value.clone()
            },
            create_revision: self.create,
            mod_revision: self.modified,
            lease: self.lease,
        }
    }
}

#[derive(Debug)]
struct State {
    revision: i64,
    next_lease: i64,
    leases: BTreeMap<i64, LeaseRec>,
}

/// A store backend in the node's journal.
#[derive(Debug)]
pub struct EmbeddedBackend {
    journal: Arc<Journal>,
    state: Mutex<State>,
    requests: AtomicU64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl EmbeddedBackend {
    /// Opens the embedded store inside `journal`.
    pub fn open(journal: Arc<Journal>) -> Result<EmbeddedBackend, BackendError> {
        let b = EmbeddedBackend {
            journal,
            state: Mutex::new(State {
                revision: 0,
                next_lease: 1,
                leases: BTreeMap::new(),
            }),
            requests: AtomicU64::new(0),
        };
        let revision = match b
            .journal
            .store_get(META_REVISION)
            .map_err(|e| b.jerr("open", "revision", e))?
        {
            None => 0,
            Some(v) => i64::from_be_bytes(
                v.as_slice()
                    .try_into()
                    .map_err(|_| b.corrupt("open", "revision", "not 8 bytes"))?,
            ),
        };
        let mut leases = BTreeMap::new();
        let end = super::backend::prefix_end(META_LEASE);
        for (k, v) in b
            .journal
            .store_range(META_LEASE, &end)
            .map_err(|e| b.jerr("open", "leases", e))?
        {
            let key = String::from_utf8_lossy(&k).into_owned();
            let id = k
                .get(META_LEASE.len()..)
                .and_then(|s| <[u8; 8]>::try_from(s).ok())
                .map(i64::from_be_bytes)
                .ok_or_else(|| b.corrupt("open", &key, "malformed lease key"))?;
            let rec: LeaseRec =
                serde_json::from_slice(&v).map_err(|e| b.corrupt("open", &key, &e.to_string()))?;
            leases.insert(id, rec);
        }
        {
            let mut st = b.state.lock().unwrap_or_else(|e| e.into_inner());
            st.revision = revision;
            st.next_lease = leases.keys().next_back().map_or(1, |m| m + 1);
            st.leases = leases;
        }
        Ok(b)
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    fn err(&self, kind: BackendErrorKind, op: &str, key: &str, message: String) -> BackendError {
        BackendError {
            kind,
            op: op.to_string(),
            key: key.to_string(),
            endpoint: self.describe(),
            message,
        }
    }

    fn jerr(&self, op: &str, key: &str, e: JournalError) -> BackendError {
        let kind = if e.is_corruption() {
            BackendErrorKind::Corrupt
        } else {
            BackendErrorKind::Unavailable
        };
        self.err(kind, op, key, e.to_string())
    }

    fn corrupt(&self, op: &str, key: &str, why: &str) -> BackendError {
        self.err(BackendErrorKind::Corrupt, op, key, why.to_string())
    }

    fn read(
        &self,
        overlay: &BTreeMap<Vec<u8>, Option<Entry>>,
        op: &str,
        key: &[u8],
    ) -> Result<Option<Entry>, BackendError> {
        if let Some(e) = overlay.get(key) {
            return Ok(e.clone());
        }
        let show = String::from_utf8_lossy(key);
        match self
            .journal
            .store_get(key)
            .map_err(|e| self.jerr(op, &show, e))?
        {
            None => Ok(None),
            Some(v) => Entry::decode(&v)
                .map(Some)
                .ok_or_else(|| self.corrupt(op, &show, "entry shorter than its header")),
        }
    }

    fn range(
        &self,
        overlay: &BTreeMap<Vec<u8>, Option<Entry>>,
        op: &str,
        start: &[u8],
        end: &[u8],
    ) -> Result<Vec<(Vec<u8>, Entry)>, BackendError> {
        let show = String::from_utf8_lossy(start).into_owned();
        let hi: &[u8] = if end == [0] { &[] } else { end };
        let mut m: BTreeMap<Vec<u8>, Option<Entry>> = BTreeMap::new();
        for (k, v) in self
            .journal
            .store_range(start, hi)
            .map_err(|e| self.jerr(op, &show, e))?
        {
            if k.first() == Some(&META) {
                continue;
            }
            let e = Entry::decode(&v).ok_or_else(|| {
                self.corrupt(
                    op,
                    &String::from_utf8_lossy(&k),
                    "entry shorter than its header",
                )
            })?;
            m.insert(k, Some(e));
        }
        for (k, v) in overlay.iter() {
            if k.as_slice() >= start && (hi.is_empty() || k.as_slice() < hi) {
                m.insert(k.clone(), v.clone());
            }
        }
        Ok(m.into_iter().filter_map(|(k, v)| Some((k, v?))).collect())
    }

    fn check(
        &self,
        overlay: &BTreeMap<Vec<u8>, Option<Entry>>,
        op: &str,
        c: &Cmp,
    ) -> Result<bool, BackendError> {
        Ok(match c {
            Cmp::CreateRevision { key, op: o, rev } => {
                let have = self.read(overlay, op, key)?.map_or(0, |e| e.create);
                o.holds(have, *rev)
            }
            Cmp::ModRevision { key, op: o, rev } => {
                let have = self.read(overlay, op, key)?.map_or(0, |e| e.modified);
                o.holds(have, *rev)
            }
            Cmp::ValueEquals { key, value } => self
                .read(overlay, op, key)?
                .is_some_and(|e| &e.value == value),
            Cmp::RangeUnchangedBefore { start, end, rev } => self
                .range(overlay, op, start, end)?
                .iter()
                .all(|(_, e)| e.modified < *rev),
        })
    }

    /// Deletes the keys of expired leases, as etcd's lessor does, in one
    /// revision. Called under the state lock before every transaction.
    fn expire(&self, st: &mut State, op: &str) -> Result<(), BackendError> {
        let now = now_ms();
        let expired: Vec<i64> = st
            .leases
            .iter()
            .filter(|(_, l)| l.expires_ms <= now)
            .map(|(id, _)| *id)
            .collect();
        if expired.is_empty() {
            return Ok(());
        }
        self.drop_leases(st, op, &expired)
    }

    fn drop_leases(&self, st: &mut State, op: &str, ids: &[i64]) -> Result<(), BackendError> {
        let mut batch = Batch::new();
        let all = self.range(&BTreeMap::new(), op, &[1], &[])?;
        let mut deleted = false;
        for (k, e) in all {
            if ids.contains(&e.lease) {
                batch.delete_store(&k);
                deleted = true;
            }
        }
        for id in ids {
            batch.delete_store(&lease_key(*id));
        }
        let rev = if deleted {
            st.revision + 1
        } else {
            st.revision
        };
        batch.put_store(META_REVISION, &rev.to_be_bytes());
        self.journal
            .commit(batch)
            .map_err(|e| self.jerr(op, "leases", e))?;
        st.revision = rev;
        for id in ids {
            st.leases.remove(id);
        }
        Ok(())
    }

    fn put_lease(
        &self,
        st: &mut State,
        op: &str,
        id: i64,
        rec: LeaseRec,
    ) -> Result<(), BackendError> {
        let mut batch = Batch::new();
        let v = serde_json::to_vec(&rec)
            .map_err(|e| self.err(BackendErrorKind::Rejected, op, "lease", e.to_string()))?;
        batch.put_store(&lease_key(id), &v);
        self.journal
            .commit(batch)
            .map_err(|e| self.jerr(op, &format!("lease {id:x}"), e))?;
        st.leases.insert(id, rec);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run_txn(&self, op: &str, txn: Txn) -> Result<TxnResult, BackendError> {
        let mut st = self.lock();
        self.expire(&mut st, op)?;
        let mut overlay: BTreeMap<Vec<u8>, Option<Entry>> = BTreeMap::new();
        let mut ok = true;
        for c in &txn.when {
            if !self.check(&overlay, op, c)? {
                ok = false;
                break;
            }
        }
        let ops = if ok { txn.then } else { txn.otherwise };
        let new_rev = st.revision + 1;
        let mut batch = Batch::new();
        let mut wrote = false;
        let mut results = Vec::with_capacity(ops.len());
        for o in ops {
            match o {
                Op::Put { key, value, lease } => {
                    let show = String::from_utf8_lossy(&key).into_owned();
                    if key.first().is_none_or(|b| *b == META) {
                        return Err(self.err(
                            BackendErrorKind::Rejected,
                            op,
                            &show,
                            "empty key or reserved first byte".into(),
                        ));
                    }
                    if lease != 0 && !st.leases.contains_key(&lease) {
                        return Err(self.err(
                            BackendErrorKind::Rejected,
                            op,
                            &show,
                            format!("lease {lease:x} not found"),
                        ));
                    }
                    let create = self.read(&overlay, op, &key)?.map_or(new_rev, |e| e.create);
                    let e = Entry {
                        create,
                        modified: new_rev,
                        lease,
                        value,
                    };
                    batch.put_store(&key, &e.encode());
                    overlay.insert(key, Some(e));
                    wrote = true;
                    results.push(OpResult::Put);
                }
                Op::Delete { key } => {
                    let n = u64::from(self.read(&overlay, op, &key)?.is_some());
                    if n > 0 {
                        batch.delete_store(&key);
                        overlay.insert(key, None);
                        wrote = true;
                    }
                    results.push(OpResult::Deleted(n));
                }
                Op::DeleteRange { start, end } => {
                    let victims = self.range(&overlay, op, &start, &end)?;
                    for (k, _) in &victims {
                        batch.delete_store(k);
                        overlay.insert(k.clone(), None);
                    }
                    wrote |= !victims.is_empty();
                    results.push(OpResult::Deleted(victims.len() as u64));
                }
                Op::Range {
                    start,
                    end,
                    limit,
                    keys_only,
                } => {
                    let kvs = if end.is_empty() {
                        self.read(&overlay, op, &start)?
                            .map(|e| vec![e.kv(&start, keys_only)])
                            .unwrap_or_default()
                    } else {
                        let mut all = self.range(&overlay, op, &start, &end)?;
                        if limit > 0 {
                            all.truncate(limit as usize);
                        }
                        all.iter().map(|(k, e)| e.kv(k, keys_only)).collect()
                    };
                    results.push(OpResult::Range(kvs));
                }
            }
        }
        if wrote {
            batch.put_store(META_REVISION, &new_rev.to_be_bytes());
            self.journal
                .commit(batch)
                .map_err(|e| self.jerr(op, "txn", e))?;
            st.revision = new_rev;
        }
        Ok(TxnResult {
            succeeded: ok,
            revision: st.revision,
            results,
        })
    }
}

fn lease_key(id: i64) -> Vec<u8> {
    let mut k = META_LEASE.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

impl Backend for EmbeddedBackend {
    async fn txn(&self, op: &str, txn: Txn) -> Result<TxnResult, BackendError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.run_txn(op, txn)
    }

    async fn lease_grant(&self, ttl_secs: i64) -> Result<i64, BackendError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if ttl_secs <= 0 {
            return Err(self.err(
                BackendErrorKind::Rejected,
                "grant lease",
                "-",
                format!("TTL {ttl_secs} must be positive"),
            ));
        }
        let mut st = self.lock();
        let id = st.next_lease;
        st.next_lease += 1;
        let rec = LeaseRec {
            ttl: ttl_secs,
            expires_ms: now_ms() + ttl_secs as u64 * 1000,
        };
        self.put_lease(&mut st, "grant lease", id, rec)?;
        Ok(id)
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<i64, BackendError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        self.expire(&mut st, "keep lease alive")?;
        let Some(mut rec) = st.leases.get(&id).copied() else {
            return Ok(0);
        };
        rec.expires_ms = now_ms() + rec.ttl as u64 * 1000;
        self.put_lease(&mut st, "keep lease alive", id, rec)?;
        Ok(rec.ttl)
    }

    async fn lease_revoke(&self, id: i64) -> Result<(), BackendError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        if st.leases.contains_key(&id) {
            self.drop_leases(&mut st, "revoke lease", &[id])?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("embedded store {}", self.journal.dir().display())
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}
