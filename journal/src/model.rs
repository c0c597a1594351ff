//! The records the journal holds, as the rest of coil sees them.
//!
//! These are the journal's public types. They are deliberately not the types
//! written to disk: [`crate::codec`] converts them to and from the persisted
//! `v1` structs, so the on-disk format can evolve (with a migration) without
//! touching callers, and a decoded value is validated before it is handed out.

use std::net::IpAddr;

use ipnet::IpNet;

/// Identity of the node and of the kernel boot the journal last saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMeta {
    /// Kubernetes node name this journal belongs to.
    pub node_name: String,
    /// `/proc/sys/kernel/random/boot_id` of the boot that last wrote kernel
    /// state. A different boot id at startup means that state is gone.
    pub boot_id: String,
    /// Identity of the cluster store (etcd cluster id or embedded store id),
    /// so a journal is never reconciled against the wrong cluster.
    pub cluster_id: String,
    /// Unix seconds when the journal was initialised.
    pub created_unix: u64,
}

/// Lifecycle of a block lease as the node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseState {
    /// Intent to acquire written; the store may or may not hold the lease yet.
    Acquiring,
    /// Held in the store under our name and epoch; addresses may be handed out.
    Leased,
    /// Intent to release written; no new addresses from this block.
    Releasing,
    /// The store says another node holds it: never hand out its addresses.
    Quarantined,
}

/// A block of addresses leased to this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockLease {
    /// Pool the block belongs to.
    pub pool: String,
    /// The block itself (network address and prefix length).
    pub block: IpNet,
    /// Lease epoch as recorded in the store; fences stale owners.
    pub epoch: u64,
    pub state: LeaseState,
    /// Offset in the block where the next address search starts, so a freed
    /// address is not handed out again immediately.
    pub alloc_cursor: u32,
}

/// Identifies one attachment as the CNI spec does: the network name, the
/// container id and the interface name. Records written by journal format 1
/// carry no network name; they decode with an empty `network` (see
/// [`AttachmentKey::is_legacy`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AttachmentKey {
    /// The network configuration's `name`; empty for a format-1 record.
    pub network: String,
    pub container_id: String,
    pub ifname: String,
}

impl AttachmentKey {
    pub fn new(
        network: impl Into<String>,
        container_id: impl Into<String>,
        ifname: impl Into<String>,
    ) -> Self {
        AttachmentKey {
            network: network.into(),
            container_id: container_id.into(),
            ifname: ifname.into(),
        }
    }

    /// A key of a record written before attachments carried their network
    /// (journal format 1): which network owns it is not known.
    pub fn is_legacy(&self) -> bool {
        self.network.is_empty()
    }

    /// The same attachment, owned by `network` (adopting a legacy record).
    pub fn with_network(&self, network: &str) -> AttachmentKey {
        AttachmentKey::new(network, self.container_id.clone(), self.ifname.clone())
    }
}

impl std::fmt::Display for AttachmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.network.is_empty() {
            write!(f, "{}/{}", self.container_id, self.ifname)
        } else {
            write!(f, "{}:{}/{}", self.network, self.container_id, self.ifname)
        }
    }
}

/// Lifecycle of a pod attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttachmentState {
    /// Addresses reserved in the journal; kernel wiring not yet confirmed.
    Reserved,
    /// Kernel wiring done; the ADD result has been (or may be) returned.
    Wired,
    /// DEL accepted; kernel state being removed. The addresses stay reserved
    /// until the kernel state is gone.
    Releasing,
}

/// One address handed to an attachment, with the block it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AssignedAddress {
    pub addr: IpAddr,
    pub block: IpNet,
}

/// A pod's network attachment on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub key: AttachmentKey,
    /// CNI_NETNS at ADD time; empty when unknown.
    pub netns: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pool: String,
    pub addresses: Vec<AssignedAddress>,
    /// Name of the host end of the veth.
    pub host_veth: String,
    pub state: AttachmentState,
    /// Boot id of the kernel the wiring was made in.
    pub boot_id: String,
    pub created_unix: u64,
}

/// The effect an intent announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntentOp {
    /// Acquire a block for `pool` in the store (the block is unknown until
    /// the store answers, so it is recorded when known).
    AcquireBlock { pool: String, block: Option<IpNet> },
    /// Release `block` of `pool` in the store.
    ReleaseBlock { pool: String, block: IpNet },
    /// Create the kernel wiring of an attachment.
    Wire { key: AttachmentKey },
    /// Remove the kernel wiring of an attachment.
    Unwire { key: AttachmentKey },
    /// Publish a block into the export routing table.
    ExportBlock { block: IpNet },
    /// Withdraw a block from the export routing table.
    WithdrawBlock { block: IpNet },
}

/// Where an intent stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntentState {
    /// Written, effect possibly half done: recovery must roll it forward or back.
    Pending,
    /// Effect complete.
    Done,
    /// Effect rolled back or never started, with why.
    Aborted { reason: String },
}

/// A numbered record of an effect about to be performed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    pub id: u64,
    pub op: IntentOp,
    pub state: IntentState,
    pub created_unix: u64,
}

/// The owner of an address in the node's address index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressEntry {
    pub attachment: AttachmentKey,
    pub block: IpNet,
}
