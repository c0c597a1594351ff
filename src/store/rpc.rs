//! The store's socket protocol: a [`Backend`] call as coilctl sends it to a
//! coild that owns the embedded store, and coild's answer. The client side
//! (a Unix socket) is `coil_adapters::remote::RemoteBackend`; coild runs
//! each call with [`serve_rpc`].

use serde::{Deserialize, Serialize};

use super::backend::{Backend, BackendError, Txn, TxnResult};

/// A backend call sent to coild.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreRpc {
    Txn {
        op: String,
        txn: Txn,
    },
    LeaseGrant {
        ttl: i64,
    },
    LeaseKeepAlive {
        id: i64,
    },
    LeaseRevoke {
        id: i64,
    },
    /// Requests coild's backend has sent so far (for benchmarks).
    Requests,
}

/// coild's answer to a [`StoreRpc`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreReply {
    Txn(TxnResult),
    Value(i64),
    Done,
    Err(BackendError),
}

/// Runs one [`StoreRpc`] on a backend (coild's side).
pub async fn serve_rpc<B: Backend>(b: &B, rpc: StoreRpc) -> StoreReply {
    let r = match rpc {
        StoreRpc::Txn { op, txn } => b.txn(&op, txn).await.map(StoreReply::Txn),
        StoreRpc::LeaseGrant { ttl } => b.lease_grant(ttl).await.map(StoreReply::Value),
        StoreRpc::LeaseKeepAlive { id } => b.lease_keep_alive(id).await.map(StoreReply::Value),
        StoreRpc::LeaseRevoke { id } => b.lease_revoke(id).await.map(|_| StoreReply::Done),
        StoreRpc::Requests => Ok(StoreReply::Value(
            i64::try_from(b.requests()).unwrap_or(i64::MAX),
        )),
    };
    r.unwrap_or_else(StoreReply::Err)
}
