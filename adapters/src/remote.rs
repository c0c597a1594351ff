//! The embedded store reached through coild's socket.
//!
//! In embedded mode coild owns the store (its journal is locked). coilctl
//! then sends each backend call over coild's UNIX socket (root-only, mode
//! 0600) and coild runs it on its embedded backend, so every coilctl
//! command works unchanged while coild runs.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use coil::store::backend::{Backend, BackendError, BackendErrorKind, Txn, TxnResult};
use coil::store::rpc::{StoreReply, StoreRpc};

/// A backend that forwards every call to coild.
#[derive(Debug)]
pub struct RemoteBackend {
    socket: PathBuf,
    timeout: Duration,
    requests: AtomicU64,
}

impl RemoteBackend {
    pub fn new(socket: PathBuf, timeout: Duration) -> RemoteBackend {
        RemoteBackend {
            socket,
            timeout,
            requests: AtomicU64::new(0),
        }
    }

    fn err(&self, op: &str, msg: String) -> BackendError {
        BackendError {
            kind: BackendErrorKind::Unavailable,
            op: op.to_string(),
            key: "-".into(),
            endpoint: self.describe(),
            message: msg,
        }
    }

    async fn call(&self, op: &str, rpc: StoreRpc) -> Result<StoreReply, BackendError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let body = serde_json::to_vec(&coil::api::SocketRequest::Store(rpc))
            .map_err(|e| self.err(op, format!("encoding: {e}")))?;
        let exchange = async {
            let mut s = tokio::net::UnixStream::connect(&self.socket).await?;
            s.write_all(&body).await?;
            s.shutdown().await?;
            let mut out = Vec::new();
            (&mut s)
                .take(coil::api::MAX_ANSWER as u64)
                .read_to_end(&mut out)
                .await?;
            Ok::<_, std::io::Error>(out)
        };
        let out = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => return Err(self.err(op, e.to_string())),
            Err(_) => return Err(self.err(op, format!("no answer within {:?}", self.timeout))),
        };
        let reply: StoreReply = serde_json::from_slice(&out)
            .map_err(|e| self.err(op, format!("malformed answer: {e}")))?;
        match reply {
            StoreReply::Err(e) => Err(e),
            other => Ok(other),
        }
    }
}

fn unexpected(op: &str, endpoint: String) -> BackendError {
    BackendError {
        kind: BackendErrorKind::Rejected,
        op: op.to_string(),
        key: "-".into(),
        endpoint,
        message: "unexpected answer from coild".into(),
    }
}

impl Backend for RemoteBackend {
    async fn txn(&self, op: &str, txn: Txn) -> Result<TxnResult, BackendError> {
        match self
            .call(
                op,
                StoreRpc::Txn {
                    op: op.to_string(),
                    txn,
                },
            )
            .await?
        {
            StoreReply::Txn(r) => Ok(r),
            _ => Err(unexpected(op, self.describe())),
        }
    }

    async fn lease_grant(&self, ttl: i64) -> Result<i64, BackendError> {
        match self
            .call("grant lease", StoreRpc::LeaseGrant { ttl })
            .await?
        {
            StoreReply::Value(v) => Ok(v),
            _ => Err(unexpected("grant lease", self.describe())),
        }
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<i64, BackendError> {
        match self
            .call("keep lease alive", StoreRpc::LeaseKeepAlive { id })
            .await?
        {
            StoreReply::Value(v) => Ok(v),
            _ => Err(unexpected("keep lease alive", self.describe())),
        }
    }

    async fn lease_revoke(&self, id: i64) -> Result<(), BackendError> {
        match self
            .call("revoke lease", StoreRpc::LeaseRevoke { id })
            .await?
        {
            StoreReply::Done => Ok(()),
            _ => Err(unexpected("revoke lease", self.describe())),
        }
    }

    fn describe(&self) -> String {
        format!("coild at {}", self.socket.display())
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}
