//! The store seam: a small transactional key/value interface with etcd's
//! semantics (revisions, compare-and-swap transactions, leases).
//!
//! Two adapters implement it: `coil_adapters::etcd::EtcdBackend` (a real etcd
//! cluster) and [`super::embedded::EmbeddedBackend`] (the node's own journal,
//! for single-node use). Everything coil knows about pools, blocks and nodes
//! is written once, in [`super::Store`], on top of this trait, so both
//! backends behave the same by construction and one contract suite tests
//! them both.

use std::fmt;
use std::future::Future;

use serde::{Deserialize, Serialize};

/// One key/value pair with its etcd-style metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// Revision of the transaction that created the key (its incarnation).
    pub create_revision: i64,
    /// Revision of the transaction that last wrote the key.
    pub mod_revision: i64,
    /// Lease the key is bound to, 0 for none.
    pub lease: i64,
}

impl KeyValue {
    pub fn key_str(&self) -> String {
        String::from_utf8_lossy(&self.key).into_owned()
    }
}

/// Comparison operators of a transaction guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CmpOp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

impl CmpOp {
    pub(crate) fn holds(self, have: i64, want: i64) -> bool {
        match self {
            CmpOp::Equal => have == want,
            CmpOp::NotEqual => have != want,
            CmpOp::Less => have < want,
            CmpOp::Greater => have > want,
        }
    }
}

/// A transaction guard. A missing key has create/mod revision 0.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Cmp {
    CreateRevision {
        key: Vec<u8>,
        op: CmpOp,
        rev: i64,
    },
    ModRevision {
        key: Vec<u8>,
        op: CmpOp,
        rev: i64,
    },
    /// The key exists and its value equals `value` byte for byte.
    ValueEquals {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// Every key in `[start, end)` was last written before `rev` (holds for
    /// an empty range). This is how a transaction fences "nothing in this
    /// range changed since I read it at revision rev-1".
    RangeUnchangedBefore {
        start: Vec<u8>,
        end: Vec<u8>,
        rev: i64,
    },
}

/// An operation inside a transaction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Op {
    /// Put a value, bound to `lease` unless it is 0.
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
    },
    Delete {
        key: Vec<u8>,
    },
    DeleteRange {
        start: Vec<u8>,
        end: Vec<u8>,
    },
    /// Read the keys in `[start, end)` (or exactly `start` when `end` is
    /// empty), at most `limit` of them (0 = no limit).
    Range {
        start: Vec<u8>,
        end: Vec<u8>,
        limit: i64,
        keys_only: bool,
    },
}

impl Op {
    pub fn get(key: impl Into<Vec<u8>>) -> Op {
        Op::Range {
            start: key.into(),
            end: Vec::new(),
            limit: 0,
            keys_only: false,
        }
    }

    pub fn range(start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> Op {
        Op::Range {
            start: start.into(),
            end: end.into(),
            limit: 0,
            keys_only: false,
        }
    }

    pub fn prefix(prefix: &str) -> Op {
        Op::range(prefix.as_bytes().to_vec(), prefix_end(prefix.as_bytes()))
    }

    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: 0,
        }
    }

    /// Is this a write?
    pub fn is_write(&self) -> bool {
        !matches!(self, Op::Range { .. })
    }
}

/// What one operation returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    Put,
    Deleted(u64),
    Range(Vec<KeyValue>),
}

impl OpResult {
    /// The key/values of a read; empty for writes.
    pub fn into_kvs(self) -> Vec<KeyValue> {
        match self {
            OpResult::Range(kvs) => kvs,
            _ => Vec::new(),
        }
    }
}

/// A compare-and-swap transaction: if every guard holds, `then` runs,
/// otherwise `otherwise` runs, atomically.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Txn {
    pub when: Vec<Cmp>,
    pub then: Vec<Op>,
    pub otherwise: Vec<Op>,
}

impl Txn {
    /// Checks that every key and range the transaction touches or compares
    /// lies under `prefix` (coild serves coilctl's embedded-store calls
    /// only inside coil's own prefix).
    pub fn confined_to(&self, prefix: &[u8]) -> Result<(), String> {
        let end = prefix_end(prefix);
        let key_ok = |k: &[u8]| k.starts_with(prefix);
        // A range [start, end) is inside when it starts inside and ends at
        // or before the prefix's end; an empty end means the single key.
        let range_ok = |s: &[u8], e: &[u8]| key_ok(s) && (e.is_empty() || e <= end.as_slice());
        let show = |k: &[u8]| String::from_utf8_lossy(k).into_owned();
        for c in &self.when {
            let (ok, what) = match c {
                Cmp::CreateRevision { key, .. }
                | Cmp::ModRevision { key, .. }
                | Cmp::ValueEquals { key, .. } => (key_ok(key), show(key)),
                Cmp::RangeUnchangedBefore { start, end, .. } => (
                    range_ok(start, end),
                    format!("{}..{}", show(start), show(end)),
                ),
            };
            if !ok {
                return Err(format!("compare on {what:?} outside {:?}", show(prefix)));
            }
        }
        for op in self.then.iter().chain(&self.otherwise) {
            let (ok, what) = match op {
                Op::Put { key, .. } | Op::Delete { key } => (key_ok(key), show(key)),
                Op::DeleteRange { start, end } | Op::Range { start, end, .. } => (
                    range_ok(start, end),
                    format!("{}..{}", show(start), show(end)),
                ),
            };
            if !ok {
                return Err(format!("operation on {what:?} outside {:?}", show(prefix)));
            }
        }
        Ok(())
    }

    /// A read-only snapshot: every op runs at one revision.
    pub fn read(ops: Vec<Op>) -> Txn {
        Txn {
            when: Vec::new(),
            then: ops,
            otherwise: Vec::new(),
        }
    }
}

/// The outcome of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResult {
    pub succeeded: bool,
    /// The store revision after the transaction (the revision of its writes
    /// when it wrote anything).
    pub revision: i64,
    pub results: Vec<OpResult>,
}

impl TxnResult {
    /// The key/values of the `i`th operation (empty if it was not a read).
    pub fn kvs(&mut self, i: usize) -> Vec<KeyValue> {
        match self.results.get_mut(i) {
            Some(r) => std::mem::replace(r, OpResult::Put).into_kvs(),
            None => Vec::new(),
        }
    }
}

/// How a backend call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendErrorKind {
    /// The store could not be reached or did not answer in time; a retry
    /// later can succeed.
    Unavailable,
    /// The store answered and refused the request (permissions, limits).
    Rejected,
    /// A stored entry could not be decoded.
    Corrupt,
}

/// A failed backend call, naming the operation, the key and the endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendError {
    pub kind: BackendErrorKind,
    /// What coil was doing ("acquire block", "list pools").
    pub op: String,
    /// The first key the request touched.
    pub key: String,
    /// Where the store lives (etcd endpoints or the embedded store's dir).
    pub endpoint: String,
    pub message: String,
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            BackendErrorKind::Unavailable => "store unavailable",
            BackendErrorKind::Rejected => "store refused the request",
            BackendErrorKind::Corrupt => "corrupt store entry",
        };
        write!(
            f,
            "{what}: {} (key {}) at {}: {}",
            self.op, self.key, self.endpoint, self.message
        )
    }
}

impl std::error::Error for BackendError {}

/// The store seam. Implementations must be linearizable: a transaction
/// sees every transaction that completed before it started.
pub trait Backend: Send + Sync + 'static {
    /// Runs one transaction. `op` names what coil is doing, for errors.
    fn txn(
        &self,
        op: &str,
        txn: Txn,
    ) -> impl Future<Output = Result<TxnResult, BackendError>> + Send;

    /// Grants a lease that expires `ttl_secs` after its last keep-alive.
    fn lease_grant(&self, ttl_secs: i64) -> impl Future<Output = Result<i64, BackendError>> + Send;

    /// Renews a lease; returns the remaining TTL in seconds, or 0 or less
    /// when the lease has expired (its keys are gone).
    fn lease_keep_alive(&self, id: i64) -> impl Future<Output = Result<i64, BackendError>> + Send;

    /// Revokes a lease, deleting its keys. Revoking an unknown lease is not
    /// an error.
    fn lease_revoke(&self, id: i64) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Where this backend's data lives, for messages.
    fn describe(&self) -> String;

    /// Requests sent so far (every txn, lease call and keep-alive counts
    /// one), for the benchmark's requests-per-acquisition figure.
    fn requests(&self) -> u64;
}

/// A shared backend is a backend (one embedded store serving many callers,
/// or many Stores on one connection).
impl<B: Backend> Backend for std::sync::Arc<B> {
    fn txn(
        &self,
        op: &str,
        txn: Txn,
    ) -> impl Future<Output = Result<TxnResult, BackendError>> + Send {
        (**self).txn(op, txn)
    }

    fn lease_grant(&self, ttl_secs: i64) -> impl Future<Output = Result<i64, BackendError>> + Send {
        (**self).lease_grant(ttl_secs)
    }

    fn lease_keep_alive(&self, id: i64) -> impl Future<Output = Result<i64, BackendError>> + Send {
        (**self).lease_keep_alive(id)
    }

    fn lease_revoke(&self, id: i64) -> impl Future<Output = Result<(), BackendError>> + Send {
        (**self).lease_revoke(id)
    }

    fn describe(&self) -> String {
        (**self).describe()
    }

    fn requests(&self) -> u64 {
        (**self).requests()
    }
}

/// The smallest key greater than every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: no upper bound; etcd spells that "\0".
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transactions_are_confined_to_a_prefix() {
        let inside = Txn {
            when: vec![Cmp::ModRevision {
                key: b"/coil/pools/a".to_vec(),
                op: CmpOp::Equal,
                rev: 0,
            }],
            then: vec![Op::put("/coil/pools/a", "x"), Op::prefix("/coil/blocks/")],
            otherwise: vec![Op::get("/coil/schema")],
        };
        assert!(inside.confined_to(b"/coil/").is_ok());
        assert!(Txn::read(vec![Op::prefix("/coil/")])
            .confined_to(b"/coil/")
            .is_ok());
        for bad in [
            Txn::read(vec![Op::DeleteRange {
                start: b"/other/".to_vec(),
                end: b"/other0".to_vec(),
            }]),
            // Starts inside, ends past the prefix.
            Txn::read(vec![Op::range("/coil/a", "/coim")]),
            Txn::read(vec![Op::put("/coilx", "v")]),
            Txn {
                when: vec![Cmp::ValueEquals {
                    key: b"/secret".to_vec(),
                    value: b"x".to_vec(),
                }],
                ..Txn::default()
            },
            Txn {
                otherwise: vec![Op::Delete { key: b"/".to_vec() }],
                ..Txn::default()
            },
        ] {
            assert!(bad.confined_to(b"/coil/").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"/coil/"), b"/coil0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn cmp_ops() {
        assert!(CmpOp::Equal.holds(3, 3));
        assert!(!CmpOp::Equal.holds(3, 4));
        assert!(CmpOp::Less.holds(3, 4));
        assert!(CmpOp::Greater.holds(5, 4));
        assert!(CmpOp::NotEqual.holds(5, 4));
    }
}
