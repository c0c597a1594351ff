use ipnet::IpNet;

use super::backend::{BackendError, BackendErrorKind};
use crate::errors::ErrorKind;

/// Why a store operation failed. Every variant names what it was about
/// (pool, block, node, key) so the message alone tells an operator what to
/// look at.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Bad input: a name, subnet or size that can never be valid.
    #[error("{0}")]
    Invalid(String),
    #[error("pool {0} already exists")]
    PoolExists(String),
    #[error("pool {0} not found")]
    PoolNotFound(String),
    #[error("subnet {subnet} overlaps {existing} of pool {pool}")]
    SubnetOverlap {
        subnet: IpNet,
        existing: IpNet,
        pool: String,
    },
    #[error("pool {pool} still has {blocks} leased block(s) on {nodes}; release them first, or use --force if they are empty")]
    PoolInUse {
        pool: String,
        blocks: usize,
        nodes: String,
    },
    #[error("pool {pool} still has {addresses} address(es) in use; it cannot be removed even with --force")]
    PoolNotEmpty { pool: String, addresses: usize },
    /// Every block of the pool is leased.
    #[error("pool {pool} is exhausted: all {blocks} {family} blocks are leased")]
    Exhausted {
        pool: String,
        family: super::Family,
        blocks: u64,
    },
    #[error("block {block} is not leased")]
    NotLeased { block: IpNet },
    #[error("block {block} is leased by {owner}, not {node}")]
    NotOwner {
        block: IpNet,
        owner: String,
        node: String,
    },
    #[error(
        "block {block} of {node} was released and leased again (epoch {current}, not {epoch})"
    )]
    StaleEpoch {
        block: IpNet,
        node: String,
        epoch: i64,
        current: i64,
    },
    #[error("block {block} is not in any pool")]
    UnknownBlock { block: IpNet },
    #[error("node {node} is alive (its liveness lease is current); use --force to release its block anyway")]
    NodeAlive { node: String },
    /// The node carries a removal fence: it may lease nothing.
    #[error("node {node} was removed from the cluster (coilctl node remove); it leases no block until an operator runs `coilctl node readmit {node}`")]
    NodeRemoved { node: String },
    /// Optimistic concurrency gave up; retrying later can succeed.
    #[error("{op} on {key}: still conflicting after {attempts} attempts; try again")]
    Conflict {
        op: String,
        key: String,
        attempts: u32,
    },
    #[error("the store at {endpoint} has schema version {found}; this coil understands up to {supported}: upgrade coil")]
    SchemaTooNew {
        endpoint: String,
        found: u32,
        supported: u32,
    },
    #[error("corrupt store entry {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl StoreError {
    /// Can the same call succeed if retried later?
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }

    /// Is the store unreachable (as opposed to refusing the request)?
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Backend(e) if e.kind == BackendErrorKind::Unavailable)
    }

    /// Is this a bad entry in the store (a value that fails to decode or
    /// to validate against its key or pool)? Callers that read one key
    /// treat it as "not ours, not free": the entry is left as it is.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, StoreError::Corrupt { .. })
    }

    /// Was the caller's input at fault (nothing in the store is wrong)?
    pub fn is_bad_input(&self) -> bool {
        matches!(self, StoreError::Invalid(_))
    }

    /// What kind of failure this is (see [`crate::errors`], the one table
    /// of CNI and exit codes).
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Invalid(_) => ErrorKind::BadInput,
            StoreError::PoolNotFound(_) => ErrorKind::NoPool,
            StoreError::Exhausted { .. } => ErrorKind::Exhausted,
            StoreError::NodeRemoved { .. } => ErrorKind::Fenced,
            StoreError::Corrupt { .. } => ErrorKind::Corrupt,
            StoreError::Conflict { .. } => ErrorKind::TryAgain,
            StoreError::Backend(e) if e.kind == BackendErrorKind::Unavailable => {
                ErrorKind::TryAgain
            }
            StoreError::Backend(_) => ErrorKind::Internal,
            StoreError::PoolExists(_)
            | StoreError::SubnetOverlap { .. }
            | StoreError::PoolInUse { .. }
            | StoreError::PoolNotEmpty { .. }
            | StoreError::NotLeased { .. }
            | StoreError::NotOwner { .. }
            | StoreError::StaleEpoch { .. }
            | StoreError::UnknownBlock { .. }
            | StoreError::NodeAlive { .. }
            | StoreError::SchemaTooNew { .. } => ErrorKind::Refused,
        }
    }

    /// The exit code coilctl uses for this error (see [`crate::exit`]).
    pub fn exit_code(&self) -> i32 {
        self.kind().exit_code()
    }

    pub(crate) fn corrupt(key: &str, reason: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }
}
