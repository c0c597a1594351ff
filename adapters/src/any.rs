//! One backend type for the programs: the store a configuration names,
//! whichever it is, so coild, coilctl and `node repair` are written once
//! over `Store<AnyBackend>` instead of once per backend.

use std::sync::Arc;

use crate::etcd::EtcdBackend;
use crate::remote::RemoteBackend;
use coil::store::backend::{Backend, BackendError, Txn, TxnResult};
use coil::store::embedded::EmbeddedBackend;

/// The store behind a configuration.
#[derive(Debug)]
pub enum AnyBackend {
    /// An etcd cluster.
    Etcd(Box<EtcdBackend>),
    /// The embedded store in a journal this process owns.
    Embedded(Arc<EmbeddedBackend>),
    /// The embedded store of a running coild, through its socket.
    Remote(RemoteBackend),
}

impl Backend for AnyBackend {
    async fn txn(&self, op: &str, txn: Txn) -> Result<TxnResult, BackendError> {
        match self {
            AnyBackend::Etcd(b) => b.txn(op, txn).await,
            AnyBackend::Embedded(b) => b.txn(op, txn).await,
            AnyBackend::Remote(b) => b.txn(op, txn).await,
        }
    }

    async fn lease_grant(&self, ttl_secs: i64) -> Result<i64, BackendError> {
        match self {
            AnyBackend::Etcd(b) => b.lease_grant(ttl_secs).await,
            AnyBackend::Embedded(b) => b.lease_grant(ttl_secs).await,
            AnyBackend::Remote(b) => b.lease_grant(ttl_secs).await,
        }
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<i64, BackendError> {
        match self {
            AnyBackend::Etcd(b) => b.lease_keep_alive(id).await,
            AnyBackend::Embedded(b) => b.lease_keep_alive(id).await,
            AnyBackend::Remote(b) => b.lease_keep_alive(id).await,
        }
    }

    async fn lease_revoke(&self, id: i64) -> Result<(), BackendError> {
        match self {
            AnyBackend::Etcd(b) => b.lease_revoke(id).await,
            AnyBackend::Embedded(b) => b.lease_revoke(id).await,
            AnyBackend::Remote(b) => b.lease_revoke(id).await,
        }
    }

    fn describe(&self) -> String {
        match self {
            AnyBackend::Etcd(b) => b.describe(),
            AnyBackend::Embedded(b) => b.describe(),
            AnyBackend::Remote(b) => b.describe(),
        }
    }

    fn requests(&self) -> u64 {
        match self {
            AnyBackend::Etcd(b) => b.requests(),
            AnyBackend::Embedded(b) => b.requests(),
            AnyBackend::Remote(b) => b.requests(),
        }
    }
}
