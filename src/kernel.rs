//! The kernel seam: what coild and recovery ask of the kernel
//! ([`KernelOps`]), the shape of one pod's wiring ([`WireSpec`]) and the
//! errors a kernel change can end in. No netlink here: the rtnetlink
//! adapter lives in the coil-adapters crate (`coil_adapters::kernel`), the
//! in-memory model in [`crate::kernel_mem`].
//!
//! *Invariants every implementation keeps:* every effect is idempotent
//! (create-or-verify, delete tolerates absence); coil only touches links
//! it named and routes carrying its protocol id.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The link-local gateway every pod routes through (v1's choice: it
/// survives kube-proxy's arp_ignore=1).
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The IPv6 equivalent, on the host end of every veth.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The gateway for a pod address of this family.
pub fn gateway_for(a: &IpAddr) -> IpAddr {
    match a {
        IpAddr::V4(_) => IpAddr::V4(GATEWAY_V4),
        IpAddr::V6(_) => IpAddr::V6(GATEWAY_V6),
    }
}

/// Why a kernel change failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("network namespace {0} does not exist")]
    NetnsMissing(String),
    /// The path is not a pod's network namespace (not nsfs, another
    /// namespace type, or coild's or the host's own).
    #[error("{0}")]
    BadNetns(String),
    /// A kernel operation did not finish within its deadline.
    #[error("{0} did not finish within {1:?}")]
    Timeout(String, std::time::Duration),
    #[error("interface {ifname} already exists in {netns}")]
    InterfaceExists { ifname: String, netns: String },
    #[error("{op} {what}: {msg}")]
    Netlink {
        op: &'static str,
        what: String,
        msg: String,
        errno: i32,
    },
    #[error("{0}")]
    Io(String),
}

type Result<T, E = KernelError> = std::result::Result<T, E>;

/// The error of a [`KernelOps::wire_after`] whose reservation never
/// became durable (its links were removed).
pub fn abandoned(w: &WireSpec) -> KernelError {
    KernelError::Io(format!(
        "wiring {} abandoned: its reservation never became durable",
        w.host_veth
    ))
}

/// What one pod attachment looks like in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireSpec {
    /// Path of the pod's network namespace.
    pub netns: String,
    /// Interface name inside the pod (CNI_IFNAME).
    pub ifname: String,
    /// Host end of the veth (derived from container id and ifname).
    pub host_veth: String,
    /// IFLA_IFALIAS of the host end, identifying the attachment.
    pub alias: String,
    /// The pod's addresses (one /32 or /128 each).
    pub addresses: Vec<IpAddr>,
    pub mtu: u32,
}

/// MAC addresses of a wired veth.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Wired {
    pub host_mac: String,
    pub pod_mac: String,
}

/// What coild and recovery need of the kernel: the seam between the node's
/// logic and netlink. The rtnetlink adapter (`coil_adapters::kernel::Kernel`) is one;
/// [`crate::kernel_mem::MemKernel`] an in-memory model of the same
/// behaviour, so the daemon and recovery run in-process without root (and
/// recovery can be timed on 100,000 attachments without creating 100,000
/// veths). Every method means what the rtnetlink adapter's method of the same name
/// documents.
pub trait KernelOps: Send + Sync + 'static {
    /// A pod's network namespace, opened and checked by
    /// [`KernelOps::open_pod_netns`], handed to [`KernelOps::wire_in`].
    type Netns: Send + 'static;
    /// A wire half done by [`KernelOps::prepare_in`].
    type Prepared: Send + 'static;

    /// The routing table coil publishes blocks in.
    fn table(&self) -> u32;
    fn open_pod_netns(&self, path: &str) -> impl Future<Output = Result<Self::Netns>> + Send;
    fn live_netns(
        &self,
        paths: Vec<String>,
    ) -> impl Future<Output = std::collections::BTreeSet<String>> + Send;
    fn names_of(&self, indexes: &[u32]) -> impl Future<Output = Result<Vec<(u32, String)>>> + Send;
    fn wire(&self, w: &WireSpec) -> impl Future<Output = Result<Wired>> + Send;
    fn wire_in(
        &self,
        w: &WireSpec,
        ns: Option<Self::Netns>,
    ) -> impl Future<Output = Result<Wired>> + Send;
    /// The part of a wire that gives the pod no address (links, gateway
    /// and default routes); may run before the reservation is durable.
    /// On failure nothing is left.
    fn prepare_in(
        &self,
        w: &WireSpec,
        ns: Option<Self::Netns>,
    ) -> impl Future<Output = Result<Self::Prepared>> + Send;
    /// The rest of the wire: the pod's addresses and the host routes to
    /// them. Only once the reservation is durable. On failure nothing is
    /// left.
    fn finish_in(
        &self,
        w: &WireSpec,
        p: Self::Prepared,
    ) -> impl Future<Output = Result<Wired>> + Send;
    /// A fresh reservation's whole wire: [`KernelOps::prepare_in`] at
    /// once, then [`KernelOps::finish_in`] when `durable` resolves to true
    /// (the reservation's journal batch is synced). When it resolves to
    /// false (the batch failed) the prepared links are removed and the
    /// wire fails ([`abandoned`]). The wire starts at the call, before the
    /// returned future is first polled, where the implementation can (the
    /// rtnetlink adapter hands it to one of its wiring threads as one
    /// job).
    fn wire_after(
        &self,
        w: WireSpec,
        ns: Option<Self::Netns>,
        durable: impl Future<Output = bool> + Send + 'static,
    ) -> impl Future<Output = Result<Wired>> + Send + 'static;
    fn wire_info(&self, w: &WireSpec) -> impl Future<Output = Result<Wired>> + Send;
    fn doom(
        &self,
        host_veth: &str,
        netns: &str,
        ifname: &str,
    ) -> impl Future<Output = Result<bool>> + Send;
    fn delete_doomed(&self) -> impl Future<Output = Result<()>> + Send;
    fn unwire(&self, host_veth: &str) -> impl Future<Output = Result<bool>> + Send;
    #[allow(clippy::type_complexity)]
    fn links(&self) -> impl Future<Output = Result<Vec<(u32, String, Option<String>)>>> + Send;
    fn del_host_route(&self, dst: IpNet, oif: u32) -> impl Future<Output = Result<()>> + Send;
    fn export_block(&self, block: IpNet) -> impl Future<Output = Result<()>> + Send;
    fn withdraw_block(&self, block: IpNet) -> impl Future<Output = Result<()>> + Send;
    fn exported_blocks(&self) -> impl Future<Output = Result<Vec<IpNet>>> + Send;
    fn host_routes(&self) -> impl Future<Output = Result<Vec<(IpNet, u32)>>> + Send;
    fn check(&self, w: &WireSpec) -> impl Future<Output = Result<Vec<String>>> + Send;
}
