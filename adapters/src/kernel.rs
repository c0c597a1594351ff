//! The kernel adapter: veths, addresses and routes over rtnetlink. The only
//! code that knows rtnetlink; it implements core's [`KernelOps`] seam.
//!
//! *Invariants:* every effect is idempotent (create-or-verify, delete
//! tolerates absence); coil only touches links it named and routes carrying
//! its protocol id; `setns` happens only on a wiring thread
//! ([`crate::wirer`]), a short-lived dedicated thread, or the caller's own
//! thread of [`Kernel::wire_blocking`] (never on a runtime thread); an
//! ADD's requests go over blocking sockets ([`crate::nlsync`]) on the
//! wiring threads; and the pod end of a veth is created
//! directly inside the pod's netns (moving a link costs ~20 ms).

use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use ipnet::IpNet;
use nix::sched::CloneFlags;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkExtentMask, LinkFlags, LinkMessage,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{
    AddressMessageBuilder, Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

use crate::netns::{Forbidden, NetnsError};
use crate::nlsync::{Nl, NlError};
use crate::wirer::{WireJobError, Wirer, Worker};
use coil::kernel::{KernelError, KernelOps, WireSpec, Wired, GATEWAY_V4, GATEWAY_V6};

const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EEXIST: i32 = 17;
const ENODEV: i32 = 19;

type Result<T, E = KernelError> = std::result::Result<T, E>;

fn errno(e: &rtnetlink::Error) -> i32 {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.raw_code().abs(),
        _ => 0,
    }
}

fn nl(op: &'static str, what: impl Into<String>, e: rtnetlink::Error) -> KernelError {
    KernelError::Netlink {
        op,
        what: what.into(),
        errno: errno(&e),
        msg: e.to_string(),
    }
}

/// A wire half done by [`Kernel::prepare_in`]: the links exist, without
/// the pod's addresses.
#[derive(Debug)]
pub struct Prepared {
    /// A socket in the pod's netns, for [`Kernel::finish_in`].
    pod: Nl,
    hidx: u32,
    pidx: u32,
    wired: Wired,
}

/// A netlink client of coild's own network namespace.
#[derive(Debug, Clone)]
pub struct Kernel {
    host: Handle,
    strict: Handle,
    table: u32,
    protocol: u8,
    /// The netns of this process (so libc's ifindex/name calls apply).
    local: bool,
    /// Namespaces no pod may be wired into.
    forbidden: Forbidden,
    /// Held for every dump of links or routes: a netlink socket serves one
    /// dump at a time and refuses a second with EBUSY (coild's machine
    /// reads table 119, observes the pods and scans at once).
    dumps: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The threads that run an ADD's wiring (blocking rtnetlink).
    wirer: std::sync::Arc<Wirer>,
}

fn mac(msg: &LinkMessage) -> String {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(b) => Some(
                b.iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            ),
            _ => None,
        })
        .unwrap_or_default()
}

fn alias_of(msg: &LinkMessage) -> Option<String> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfAlias(s) => Some(s.clone()),
        _ => None,
    })
}

fn name_of(msg: &LinkMessage) -> Option<String> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(s) => Some(s.clone()),
        _ => None,
    })
}

async fn get_link(h: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    match h
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(m) => Ok(m),
        Err(e) if errno(&e) == ENODEV => Ok(None),
        Err(e) => Err(nl("look up link", name, e)),
    }
}

/// Opens a netlink connection inside the network namespace `ns`, from a
/// dedicated thread that enters it and exits (so no runtime thread ever
/// changes namespace). The connection task runs on the current runtime.
/// `strict` asks for strict checking (needed to filter route dumps).
fn netns_connection(ns: &File, path: &str, strict: bool) -> Result<Handle> {
    let rt = tokio::runtime::Handle::current();
    let made = std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<_> {
            nix::sched::setns(ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            let _g = rt.enter();
            if strict {
                rtnetlink::new_connection_with_strict_check()
            } else {
                rtnetlink::new_connection()
            }
        })
        .join()
    });
    let (conn, handle, _) = match made {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(KernelError::Io(format!("entering netns {path}: {e}"))),
        Err(_) => {
            return Err(KernelError::Io(format!(
                "entering netns {path}: thread panicked"
            )))
        }
    };
    tokio::spawn(conn);
    Ok(handle)
}

fn netns_handle(ns: &File, path: &str) -> Result<Handle> {
    netns_connection(ns, path, false)
}

/// The link group of host veths whose deletion is pending (`coil` in
/// ASCII). coild moves only its own veths there ([`Kernel::doom`]) and
/// deletes the group as a whole; no other tool is expected to use this
/// group id on a node.
pub const DOOMED_GROUP: u32 = 0x636f_696c;

/// How long opening a netns path may take (path lookup can hang on a
/// stuck mount; the open runs on a blocking thread and is abandoned).
pub const NETNS_OPEN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

fn netns_error(e: NetnsError) -> KernelError {
    match e {
        NetnsError::Missing(p) => KernelError::NetnsMissing(p),
        e @ (NetnsError::NotNetns { .. } | NetnsError::Forbidden { .. }) => {
            KernelError::BadNetns(e.to_string())
        }
        e @ NetnsError::Io { .. } => KernelError::Io(e.to_string()),
    }
}

/// Opens a pod's netns path after checking it is one (see [`crate::netns`]),
/// off the runtime's threads and within [`NETNS_OPEN_DEADLINE`].
async fn open_netns(path: &str, forbidden: &Forbidden) -> Result<File> {
    let p = path.to_string();
    let f = forbidden.clone();
    let job = tokio::task::spawn_blocking(move || crate::netns::open(&p, &f));
    match tokio::time::timeout(NETNS_OPEN_DEADLINE, job).await {
        Ok(Ok(r)) => r.map_err(netns_error),
        Ok(Err(e)) => Err(KernelError::Io(format!("opening netns {path}: {e}"))),
        Err(_) => Err(KernelError::Timeout(
            format!("opening netns {path}"),
            NETNS_OPEN_DEADLINE,
        )),
    }
}

fn host_prefix(a: &IpAddr) -> u8 {
    if a.is_ipv4() {
        32
    } else {
        128
    }
}

impl Kernel {
    /// Connects to the kernel of the current network namespace. Must run
    /// inside a tokio runtime.
    pub fn new(table: u32, protocol: u8) -> Result<Kernel> {
        let (c1, host, _) =
            rtnetlink::new_connection().map_err(|e| KernelError::Io(format!("netlink: {e}")))?;
        tokio::spawn(c1);
        let (c2, strict, _) = rtnetlink::new_connection_with_strict_check()
            .map_err(|e| KernelError::Io(format!("netlink: {e}")))?;
        tokio::spawn(c2);
        let home = File::open("/proc/thread-self/ns/net")
            .map_err(|e| KernelError::Io(format!("opening this thread's netns: {e}")))?;
        Ok(Kernel {
            host,
            strict,
            table,
            protocol,
            local: true,
            forbidden: Forbidden::own_and_host(),
            dumps: Default::default(),
            wirer: std::sync::Arc::new(Wirer::new(home)),
        })
    }

    /// Connects to the kernel of another network namespace (for tools and
    /// benchmarks that run outside coild's netns). Must run inside a tokio
    /// runtime.
    pub async fn in_netns(path: &str, table: u32, protocol: u8) -> Result<Kernel> {
        let ns = open_netns(path, &Forbidden::default()).await?;
        let host = netns_connection(&ns, path, false)?;
        let strict = netns_connection(&ns, path, true)?;
        Ok(Kernel {
            host,
            strict,
            table,
            protocol,
            local: false,
            forbidden: Forbidden::own_and_host().with(path, "the node"),
            dumps: Default::default(),
            wirer: std::sync::Arc::new(Wirer::new(ns)),
        })
    }

    /// Opens `path` after checking it is a pod's network namespace
    /// (exists, is one, is not coild's or the host's); pass the result to
    /// [`Kernel::wire_in`] so the path is opened once per ADD.
    pub async fn open_pod_netns(&self, path: &str) -> Result<File> {
        open_netns(path, &self.forbidden).await
    }

    /// Which of `paths` are live pod network namespaces (recovery: a path
    /// that is missing or is not a pod's netns counts as gone). Checked off
    /// the runtime's threads; if the check does not finish within
    /// [`NETNS_OPEN_DEADLINE`] per path, the unchecked paths count as live,
    /// so nothing is released on a guess.
    pub async fn live_netns(&self, paths: Vec<String>) -> std::collections::BTreeSet<String> {
        let f = self.forbidden.clone();
        let all: std::collections::BTreeSet<String> = paths.iter().cloned().collect();
        let budget = NETNS_OPEN_DEADLINE * u32::try_from(paths.len().clamp(1, 20)).unwrap_or(20);
        let job = tokio::task::spawn_blocking(move || {
            paths
                .into_iter()
                .filter(|p| crate::netns::alive(p, &f))
                .collect::<std::collections::BTreeSet<String>>()
        });
        match tokio::time::timeout(budget, job).await {
            Ok(Ok(live)) => live,
            _ => {
                tracing::warn!("checking pod network namespaces timed out; none counted as gone");
                all
            }
        }
    }

    /// Names of the links behind `indexes`, without a full link dump (a
    /// dump costs the kernel ~50 µs per veth whose peer is in another
    /// netns). Unknown indexes are left out.
    pub async fn names_of(&self, indexes: &[u32]) -> Result<Vec<(u32, String)>> {
        if !self.local {
            let all = self.links().await?;
            return Ok(all
                .into_iter()
                .filter(|l| indexes.contains(&l.0))
                .map(|l| (l.0, l.1))
                .collect());
        }
        let mut out = Vec::with_capacity(indexes.len());
        for &i in indexes {
            let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
            // SAFETY: buf holds IF_NAMESIZE bytes as if_indextoname needs;
            // on success it is NUL-terminated.
            let p = unsafe { libc::if_indextoname(i, buf.as_mut_ptr()) };
            if !p.is_null() {
                // SAFETY: NUL-terminated by if_indextoname.
                let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
                out.push((i, name.to_string_lossy().into_owned()));
            }
        }
        Ok(out)
    }

    pub fn table(&self) -> u32 {
        self.table
    }

    fn proto(&self) -> RouteProtocol {
        RouteProtocol::from(self.protocol)
    }

    /// Creates the pod's veth and its addresses and routes. A host veth of
    /// the same name (a half-done earlier attempt of this attachment) is
    /// replaced; an interface of the pod's name already in the netns is an
    /// error.
    pub async fn wire(&self, w: &WireSpec) -> Result<Wired> {
        self.wire_in(w, None).await
    }

    /// [`Kernel::wire`] with the pod's netns already opened (and checked)
    /// by [`Kernel::open_pod_netns`], or opened here when None.
    pub async fn wire_in(&self, w: &WireSpec, ns: Option<File>) -> Result<Wired> {
        self.wire_after(w.clone(), ns, std::future::ready(true))
            .await
    }

    /// The part of a wire that gives the pod no address: the veth with
    /// its pod end created in the pod's netns, the host end's alias, both
    /// ends up, the gateway on the host end and the pod's gateway and
    /// default routes. Nothing here makes an address reachable, so coild
    /// runs it while the reservation's journal write is being synced;
    /// [`Kernel::finish_in`] adds the addresses once it is durable. On
    /// failure nothing is left. Runs on a wiring thread (see
    /// [`crate::wirer`]).
    pub async fn prepare_in(&self, w: &WireSpec, ns: Option<File>) -> Result<Prepared> {
        let ns = match ns {
            Some(f) => f,
            None => open_netns(&w.netns, &self.forbidden).await?,
        };
        let w = w.clone();
        self.on_wiring_thread(move |k| prepare_blocking(k, &w, &ns))
            .await
    }

    /// Adds the pod's addresses and the host routes to them, after
    /// [`Kernel::prepare_in`]. On failure nothing is left.
    pub async fn finish_in(&self, w: &WireSpec, p: Prepared) -> Result<Wired> {
        let w = w.clone();
        let protocol = self.protocol;
        self.on_wiring_thread(move |k| finish_blocking(k, &w, p, protocol))
            .await
    }

    /// [`KernelOps::wire_after`] as one job on a wiring thread: the links
    /// are made, the thread waits for `durable` (the journal's sync
    /// usually ends first, so it does not sleep) and adds the addresses,
    /// with no hand-off between the two halves. With `ns` given the job
    /// is handed to a thread at the call, before the returned future is
    /// first polled.
    pub fn wire_after(
        &self,
        w: WireSpec,
        ns: Option<File>,
        durable: impl Future<Output = bool> + Send + 'static,
    ) -> impl Future<Output = Result<Wired>> + Send + 'static {
        let protocol = self.protocol;
        let job = move |w: WireSpec, ns: File| {
            move |k: &mut Worker| {
                let p = prepare_blocking(k, &w, &ns)?;
                if futures::executor::block_on(durable) {
                    finish_blocking(k, &w, p, protocol)
                } else {
                    drop(p);
                    remove_half_built_blocking(k, &w);
                    Err(coil::kernel::abandoned(&w))
                }
            }
        };
        let wirer = self.wirer.clone();
        let forbidden = self.forbidden.clone();
        enum Start<P, J> {
            Now(P),
            Later(J),
        }
        let start = match ns {
            Some(ns) => Start::Now(wirer.submit(job(w.clone(), ns))),
            None => Start::Later(job),
        };
        async move {
            let pending = match start {
                Start::Now(p) => p,
                Start::Later(job) => {
                    let ns = open_netns(&w.netns, &forbidden).await?;
                    wirer.submit(job(w, ns))
                }
            };
            job_result(Wirer::wait(pending).await)
        }
    }

    /// The whole wire on the calling thread, blocking: the primitive
    /// coild's ADD is built from, without the hand-off to a wiring thread
    /// (the CNI benchmark measures the floor of an ADD with it). `ns` is
    /// the pod's netns, opened by the caller. The calling thread enters
    /// this kernel client's home namespace and stays there: call it on a
    /// thread of the caller's own, never on a runtime's.
    pub fn wire_blocking(&self, w: &WireSpec, ns: &File) -> Result<Wired> {
        let mut worker = crate::wirer::Worker::here(self.wirer.home())
            .map_err(|e| KernelError::Io(format!("netlink: {e}")))?;
        let p = prepare_blocking(&mut worker, w, ns)?;
        finish_blocking(&mut worker, w, p, self.protocol)
    }

    async fn on_wiring_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut crate::wirer::Worker) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        job_result(self.wirer.run(f).await)
    }

    async fn del_link(&self, index: u32, name: &str) -> Result<bool> {
        match self.host.link().del(index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == ENODEV => Ok(false),
            Err(e) => Err(nl("delete link", name, e)),
        }
    }

    /// The MAC addresses of a wired attachment (for repeating an ADD's
    /// answer).
    pub async fn wire_info(&self, w: &WireSpec) -> Result<Wired> {
        let host = get_link(&self.host, &w.host_veth)
            .await?
            .ok_or_else(|| KernelError::Io(format!("host veth {} is missing", w.host_veth)))?;
        let ns = open_netns(&w.netns, &self.forbidden).await?;
        let nsh = netns_handle(&ns, &w.netns)?;
        let pod = get_link(&nsh, &w.ifname)
            .await?
            .ok_or_else(|| KernelError::Io(format!("{} is missing in {}", w.ifname, w.netns)))?;
        Ok(Wired {
            host_mac: mac(&host),
            pod_mac: mac(&pod),
        })
    }

    /// Takes a pod's veth out of service without paying for its deletion
    /// now: the pod end is set down and renamed (so its name is free in the
    /// pod at once), the host end is set down and moved to [`DOOMED_GROUP`].
    /// [`Kernel::delete_doomed`] later deletes every doomed veth in one
    /// request, so one RCU grace period (what makes a veth deletion cost
    /// ~20 ms, under the rtnl lock every other link change waits on) covers
    /// many. The pod end is touched only if it is the host end's peer.
    /// Returns false when the host veth is already gone.
    pub async fn doom(&self, host_veth: &str, netns: &str, ifname: &str) -> Result<bool> {
        let Some(host) = get_link(&self.host, host_veth).await? else {
            return Ok(false);
        };
        let hidx = host.header.index;
        if !netns.is_empty() {
            match open_netns(netns, &self.forbidden).await {
                Ok(ns) => {
                    let nsh = netns_handle(&ns, netns)?;
                    if let Some(pod) = get_link(&nsh, ifname).await? {
                        let peer = pod.attributes.iter().find_map(|a| match a {
                            LinkAttribute::Link(i) => Some(*i),
                            _ => None,
                        });
                        if peer == Some(hidx) {
                            let new_name = format!("cdel{}", &host_veth[4.min(host_veth.len())..]);
                            let msg = LinkUnspec::new_with_index(pod.header.index)
                                .down()
                                .name(new_name)
                                .build();
                            nsh.link()
                                .set(msg)
                                .execute()
                                .await
                                .map_err(|e| nl("rename pod end", ifname, e))?;
                        }
                    }
                }
                // The pod's netns is gone or unusable: its end went with it
                // or is not ours to touch.
                Err(KernelError::NetnsMissing(_)) | Err(KernelError::BadNetns(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let msg = LinkUnspec::new_with_index(hidx)
            .down()
            .link_group(DOOMED_GROUP)
            .build();
        match self.host.link().set(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == ENODEV => Ok(false),
            Err(e) => Err(nl("doom host veth", host_veth, e)),
        }
    }

    /// Deletes every doomed veth (see [`Kernel::doom`]) in one request.
    pub async fn delete_doomed(&self) -> Result<()> {
        let mut req = self.host.link().del(0);
        req.message_mut()
            .attributes
            .push(LinkAttribute::Group(DOOMED_GROUP));
        match req.execute().await {
            Ok(()) => Ok(()),
            // No link in the group.
            Err(e) if errno(&e) == ENODEV => Ok(()),
            Err(e) => Err(nl("delete doomed veths", "group", e)),
        }
    }

    /// Deletes the pod's veth (the pod end and both ends' routes go with
    /// it). Absence is success; returns whether it existed.
    pub async fn unwire(&self, host_veth: &str) -> Result<bool> {
        match get_link(&self.host, host_veth).await? {
            Some(l) => self.del_link(l.header.index, host_veth).await,
            None => Ok(false),
        }
    }

    /// Every link of coild's netns: index, name, alias.
    pub async fn links(&self) -> Result<Vec<(u32, String, Option<String>)>> {
        let _dump = self.dumps.lock().await;
        let msgs: Vec<LinkMessage> = self
            .host
            .link()
            .get()
            .set_filter_mask(AddressFamily::Unspec, vec![LinkExtentMask::SkipStats])
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl("list links", "all", e))?;
        Ok(msgs
            .iter()
            .map(|m| (m.header.index, name_of(m).unwrap_or_default(), alias_of(m)))
            .collect())
    }

    /// Deletes one of coil's host routes (absence is success).
    pub async fn del_host_route(&self, dst: IpNet, oif: u32) -> Result<()> {
        let b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .map_err(|e| KernelError::Io(format!("route to {dst}: {e}")))?;
        let msg = b
            .output_interface(oif)
            .scope(RouteScope::Link)
            .protocol(self.proto())
            .build();
        match self.host.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), ESRCH | ENOENT) => Ok(()),
            Err(e) => Err(nl("delete host route", dst.to_string(), e)),
        }
    }

    fn block_route(&self, block: &IpNet, lo: u32) -> Result<RouteMessage> {
        let b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(block.network(), block.prefix_len())
            .map_err(|e| KernelError::Io(format!("route to {block}: {e}")))?;
        Ok(b.output_interface(lo)
            .table_id(self.table)
            .protocol(self.proto())
            .scope(RouteScope::Universe)
            .kind(RouteType::Unicast)
            .build())
    }

    async fn lo(&self) -> Result<u32> {
        get_link(&self.host, "lo")
            .await?
            .map(|l| l.header.index)
            .ok_or_else(|| KernelError::Io("no loopback interface".into()))
    }

    /// Publishes a leased block: `BLOCK dev lo proto P table T` (replace, so
    /// it is idempotent).
    pub async fn export_block(&self, block: IpNet) -> Result<()> {
        let msg = self.block_route(&block, self.lo().await?)?;
        self.host
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| nl("export block", block.to_string(), e))
    }

    /// Withdraws a block route; absence is success.
    pub async fn withdraw_block(&self, block: IpNet) -> Result<()> {
        let msg = self.block_route(&block, self.lo().await?)?;
        match self.host.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), ESRCH | ENOENT) => Ok(()),
            Err(e) => Err(nl("withdraw block", block.to_string(), e)),
        }
    }

    /// Routes of `table` carrying our protocol id.
    async fn our_routes(&self, table: u32, v6: bool) -> Result<Vec<RouteMessage>> {
        let mut filter = if v6 {
            RouteMessageBuilder::<Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<Ipv4Addr>::new().build()
        };
        if table < 256 {
            filter.header.table = table as u8;
        } else {
            filter.header.table = RouteHeader::RT_TABLE_UNSPEC;
            filter.attributes.push(RouteAttribute::Table(table));
        }
        filter.header.protocol = RouteProtocol::Unspec;
        filter.header.scope = RouteScope::Universe;
        filter.header.kind = RouteType::Unspec;
        let _dump = self.dumps.lock().await;
        let routes: Vec<RouteMessage> = self
            .strict
            .route()
            .get(filter)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl("list routes of table", table.to_string(), e))?;
        Ok(routes
            .into_iter()
            .filter(|r| r.header.protocol == self.proto() && route_table(r) == table)
            .collect())
    }

    /// Blocks currently published in our table, by us.
    pub async fn exported_blocks(&self) -> Result<Vec<IpNet>> {
        let mut out = Vec::new();
        for v6 in [false, true] {
            for r in self.our_routes(self.table, v6).await? {
                if let Some(n) = route_dst(&r) {
                    out.push(n);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Host routes to pods (main table, our protocol), with their output
    /// interface index.
    pub async fn host_routes(&self) -> Result<Vec<(IpNet, u32)>> {
        let mut out = Vec::new();
        for v6 in [false, true] {
            for r in self
                .our_routes(u32::from(RouteHeader::RT_TABLE_MAIN), v6)
                .await?
            {
                let oif = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                });
                if let (Some(n), Some(i)) = (route_dst(&r), oif) {
                    out.push((n, i));
                }
            }
        }
        Ok(out)
    }

    /// Compares an attachment's kernel state with `w`; returns what differs
    /// (empty when all is in place).
    pub async fn check(&self, w: &WireSpec) -> Result<Vec<String>> {
        let mut diffs = Vec::new();
        let Some(host) = get_link(&self.host, &w.host_veth).await? else {
            diffs.push(format!("host veth {} is missing", w.host_veth));
            return Ok(diffs);
        };
        if alias_of(&host).as_deref() != Some(w.alias.as_str()) {
            diffs.push(format!("host veth {} lacks alias {}", w.host_veth, w.alias));
        }
        if !host.header.flags.contains(LinkFlags::Up) {
            diffs.push(format!("host veth {} is down", w.host_veth));
        }
        let routes = self.host_routes().await?;
        for a in &w.addresses {
            let want =
                IpNet::new(*a, host_prefix(a)).map_err(|e| KernelError::Io(e.to_string()))?;
            if !routes
                .iter()
                .any(|(n, i)| *n == want && *i == host.header.index)
            {
                diffs.push(format!(
                    "host route to {want} via {} is missing",
                    w.host_veth
                ));
            }
        }
        let ns = match open_netns(&w.netns, &self.forbidden).await {
            Ok(ns) => ns,
            Err(KernelError::NetnsMissing(p)) => {
                diffs.push(format!("netns {p} is gone"));
                return Ok(diffs);
            }
            Err(KernelError::BadNetns(why)) => {
                diffs.push(why);
                return Ok(diffs);
            }
            Err(e) => return Err(e),
        };
        let nsh = netns_handle(&ns, &w.netns)?;
        let Some(pod) = get_link(&nsh, &w.ifname).await? else {
            diffs.push(format!("{} is missing in {}", w.ifname, w.netns));
            return Ok(diffs);
        };
        let addrs: Vec<IpAddr> = nsh
            .address()
            .get()
            .set_link_index_filter(pod.header.index)
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| nl("list addresses of", &w.ifname, e))?
            .into_iter()
            .filter_map(|m| {
                m.attributes.into_iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(ip),
                    _ => None,
                })
            })
            .collect();
        for a in &w.addresses {
            if !addrs.contains(a) {
                diffs.push(format!("{a} is missing on {} in {}", w.ifname, w.netns));
            }
        }
        for v6 in [false, true] {
            if !w.addresses.iter().any(|a| a.is_ipv6() == v6) {
                continue;
            }
            let mut filter = if v6 {
                RouteMessageBuilder::<Ipv6Addr>::new().build()
            } else {
                RouteMessageBuilder::<Ipv4Addr>::new().build()
            };
            filter.header.protocol = RouteProtocol::Unspec;
            filter.header.kind = RouteType::Unspec;
            let routes: Vec<RouteMessage> = nsh
                .route()
                .get(filter)
                .execute()
                .try_collect()
                .await
                .map_err(|e| nl("list routes in", &w.netns, e))?;
            let has_default = routes.iter().any(|r| {
                r.header.destination_prefix_length == 0
                    && route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN)
            });
            if !has_default {
                diffs.push(format!(
                    "default route via {} is missing in {}",
                    if v6 { "fe80::1" } else { "169.254.1.1" },
                    w.netns
                ));
            }
        }
        Ok(diffs)
    }
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

fn route_dst(r: &RouteMessage) -> Option<IpNet> {
    let len = r.header.destination_prefix_length;
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(v4)) => {
            IpNet::new(IpAddr::V4(*v4), len).ok()
        }
        RouteAttribute::Destination(RouteAddress::Inet6(v6)) => {
            IpNet::new(IpAddr::V6(*v6), len).ok()
        }
        _ => None,
    })
}
fn job_result<T>(r: std::result::Result<T, WireJobError<KernelError>>) -> Result<T> {
    match r {
        Ok(t) => Ok(t),
        Err(WireJobError::Job(e)) => Err(e),
        Err(WireJobError::Pool(e)) => Err(KernelError::Io(format!("wiring thread: {e}"))),
    }
}

fn nls(op: &'static str, what: impl Into<String>, e: NlError) -> KernelError {
    KernelError::Netlink {
        op,
        what: what.into(),
        errno: e.errno,
        msg: e.msg,
    }
}

fn ignore_exists_blocking(
    r: std::result::Result<(), NlError>,
    op: &'static str,
    what: &str,
) -> Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.errno == EEXIST => Ok(()),
        Err(e) => Err(nls(op, what, e)),
    }
}

fn get_link_blocking(nl: &mut Nl, name: &str) -> Result<Option<LinkMessage>> {
    nl.get_link(name).map_err(|e| nls("look up link", name, e))
}

fn del_link_blocking(nl: &mut Nl, index: u32, name: &str) -> Result<bool> {
    match nl.del_link(index) {
        Ok(()) => Ok(true),
        Err(e) if e.errno == ENODEV => Ok(false),
        Err(e) => Err(nls("delete link", name, e)),
    }
}

/// [`Kernel::prepare_in`] on the calling (wiring) thread.
fn prepare_blocking(k: &mut Worker, w: &WireSpec, ns: &File) -> Result<Prepared> {
    let mut pod = k
        .socket_in(ns)
        .map_err(|e| KernelError::Io(format!("netlink in netns {}: {e}", w.netns)))?;
    if get_link_blocking(&mut pod, &w.ifname)?.is_some() {
        // The name may be held by the pod end of an earlier, complete
        // wiring of this very attachment (a wire that finished after its
        // deadline, then retried): its host end carries our name and
        // alias. Replace it, as a half-done one is replaced below; refuse
        // anything else. (Refusing our own made coild free the
        // reservation while that veth still held the addresses.)
        let ours = get_link_blocking(&mut k.host, &w.host_veth)?
            .filter(|l| alias_of(l).as_deref() == Some(w.alias.as_str()));
        let exists = || KernelError::InterfaceExists {
            ifname: w.ifname.clone(),
            netns: w.netns.clone(),
        };
        let Some(old) = ours else {
            return Err(exists());
        };
        // The pod end goes with the host end.
        del_link_blocking(&mut k.host, old.header.index, &w.host_veth)?;
        if get_link_blocking(&mut pod, &w.ifname)?.is_some() {
            return Err(exists());
        }
    }
    let peer = LinkUnspec::new_with_name(&w.ifname)
        .setns_by_fd(ns.as_raw_fd())
        .mtu(w.mtu)
        .build();
    let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(w.host_veth.clone())
        .mtu(w.mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    if let Err(e) = k.host.add_link(msg.clone()) {
        if e.errno != EEXIST {
            return Err(nls("create veth", &w.host_veth, e));
        }
        // A host veth of this name is a half-done earlier attempt of this
        // very attachment (the name derives from it): replace it.
        // (Checking first would cost every ADD a round trip.)
        match get_link_blocking(&mut k.host, &w.host_veth)? {
            Some(old) => {
                del_link_blocking(&mut k.host, old.header.index, &w.host_veth)?;
                k.host
                    .add_link(msg)
                    .map_err(|e| nls("create veth", &w.host_veth, e))?;
            }
            None => {
                return Err(KernelError::InterfaceExists {
                    ifname: w.ifname.clone(),
                    netns: w.netns.clone(),
                })
            }
        }
    }
    let result = prepare_links_blocking(k, w, pod);
    if result.is_err() {
        remove_half_built_blocking(k, w);
    }
    result
}

/// Leaves nothing half-built behind: the peer dies with the host end.
fn remove_half_built_blocking(k: &mut Worker, w: &WireSpec) {
    if let Ok(Some(l)) = get_link_blocking(&mut k.host, &w.host_veth) {
        let _ = del_link_blocking(&mut k.host, l.header.index, &w.host_veth);
    }
}

fn prepare_links_blocking(k: &mut Worker, w: &WireSpec, mut pod_nl: Nl) -> Result<Prepared> {
    let host = get_link_blocking(&mut k.host, &w.host_veth)?
        .ok_or_else(|| KernelError::Io(format!("veth {} vanished", w.host_veth)))?;
    let hidx = host.header.index;
    k.host
        .set_link(
            LinkUnspec::new_with_index(hidx)
                .alias(w.alias.clone())
                .up()
                .build(),
        )
        .map_err(|e| nls("bring up", &w.host_veth, e))?;
    let pod = get_link_blocking(&mut pod_nl, &w.ifname)?
        .ok_or_else(|| KernelError::Io(format!("{} missing in {}", w.ifname, w.netns)))?;
    let pidx = pod.header.index;
    let v4 = w.addresses.iter().any(IpAddr::is_ipv4);
    let v6 = w.addresses.iter().any(IpAddr::is_ipv6);
    pod_nl
        .set_link(LinkUnspec::new_with_index(pidx).up().build())
        .map_err(|e| nls("bring up", &w.ifname, e))?;
    if v4 {
        let gw = AddressMessageBuilder::<Ipv4Addr>::new()
            .index(hidx)
            .address(GATEWAY_V4, 32)
            .build();
        ignore_exists_blocking(k.host.add_address(gw), "add gateway", &w.host_veth)?;
        let link_route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(GATEWAY_V4, 32)
            .output_interface(pidx)
            .scope(RouteScope::Link)
            .build();
        ignore_exists_blocking(
            pod_nl.add_route(link_route, false),
            "add gateway route",
            &w.ifname,
        )?;
        let default = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .gateway(GATEWAY_V4)
            .output_interface(pidx)
            .build();
        ignore_exists_blocking(
            pod_nl.add_route(default, false),
            "add default route",
            &w.ifname,
        )?;
    }
    if v6 {
        let mut gw = AddressMessageBuilder::<Ipv6Addr>::new()
            .index(hidx)
            .address(GATEWAY_V6, 64)
            .build();
        gw.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        ignore_exists_blocking(k.host.add_address(gw), "add gateway", &w.host_veth)?;
        let default = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .gateway(GATEWAY_V6)
            .output_interface(pidx)
            .build();
        ignore_exists_blocking(
            pod_nl.add_route(default, false),
            "add default route",
            &w.ifname,
        )?;
    }
    Ok(Prepared {
        pod: pod_nl,
        hidx,
        pidx,
        wired: Wired {
            host_mac: mac(&host),
            pod_mac: mac(&pod),
        },
    })
}

/// [`Kernel::finish_in`] on the calling (wiring) thread.
fn finish_blocking(k: &mut Worker, w: &WireSpec, mut p: Prepared, protocol: u8) -> Result<Wired> {
    let result = add_addresses_blocking(k, w, &mut p, protocol);
    if result.is_err() {
        remove_half_built_blocking(k, w);
    }
    result.map(|()| p.wired)
}

fn add_addresses_blocking(
    k: &mut Worker,
    w: &WireSpec,
    p: &mut Prepared,
    protocol: u8,
) -> Result<()> {
    for a in &w.addresses {
        let mut msg = match a {
            IpAddr::V4(v4) => AddressMessageBuilder::<Ipv4Addr>::new()
                .index(p.pidx)
                .address(*v4, 32)
                .build(),
            IpAddr::V6(v6) => AddressMessageBuilder::<Ipv6Addr>::new()
                .index(p.pidx)
                .address(*v6, 128)
                .build(),
        };
        if a.is_ipv6() {
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match p.pod.add_address(msg) {
            Ok(()) => {}
            Err(e) if e.errno == EEXIST => {}
            Err(e) => return Err(nls("add address", format!("{a} on {}", w.ifname), e)),
        }
    }
    for a in &w.addresses {
        let msg = host_route_msg(a, p.hidx, protocol)?;
        ignore_exists_blocking(
            k.host.add_route(msg, true),
            "add host route",
            &a.to_string(),
        )?;
    }
    Ok(())
}

fn host_route_msg(a: &IpAddr, oif: u32, protocol: u8) -> Result<RouteMessage> {
    let b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(*a, host_prefix(a))
        .map_err(|e| KernelError::Io(format!("route to {a}: {e}")))?;
    Ok(b.output_interface(oif)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::from(protocol))
        .build())
}

impl KernelOps for Kernel {
    type Netns = File;
    type Prepared = Prepared;

    fn prepare_in(
        &self,
        w: &WireSpec,
        ns: Option<File>,
    ) -> impl Future<Output = Result<Prepared>> + Send {
        Kernel::prepare_in(self, w, ns)
    }
    fn finish_in(&self, w: &WireSpec, p: Prepared) -> impl Future<Output = Result<Wired>> + Send {
        Kernel::finish_in(self, w, p)
    }
    fn wire_after(
        &self,
        w: WireSpec,
        ns: Option<File>,
        durable: impl Future<Output = bool> + Send + 'static,
    ) -> impl Future<Output = Result<Wired>> + Send + 'static {
        Kernel::wire_after(self, w, ns, durable)
    }

    fn table(&self) -> u32 {
        Kernel::table(self)
    }
    fn open_pod_netns(&self, path: &str) -> impl Future<Output = Result<File>> + Send {
        Kernel::open_pod_netns(self, path)
    }
    fn live_netns(
        &self,
        paths: Vec<String>,
    ) -> impl Future<Output = std::collections::BTreeSet<String>> + Send {
        Kernel::live_netns(self, paths)
    }
    fn names_of(&self, indexes: &[u32]) -> impl Future<Output = Result<Vec<(u32, String)>>> + Send {
        Kernel::names_of(self, indexes)
    }
    fn wire(&self, w: &WireSpec) -> impl Future<Output = Result<Wired>> + Send {
        Kernel::wire(self, w)
    }
    fn wire_in(
        &self,
        w: &WireSpec,
        ns: Option<File>,
    ) -> impl Future<Output = Result<Wired>> + Send {
        Kernel::wire_in(self, w, ns)
    }
    fn wire_info(&self, w: &WireSpec) -> impl Future<Output = Result<Wired>> + Send {
        Kernel::wire_info(self, w)
    }
    fn doom(
        &self,
        host_veth: &str,
        netns: &str,
        ifname: &str,
    ) -> impl Future<Output = Result<bool>> + Send {
        Kernel::doom(self, host_veth, netns, ifname)
    }
    fn delete_doomed(&self) -> impl Future<Output = Result<()>> + Send {
        Kernel::delete_doomed(self)
    }
    fn unwire(&self, host_veth: &str) -> impl Future<Output = Result<bool>> + Send {
        Kernel::unwire(self, host_veth)
    }
    fn links(&self) -> impl Future<Output = Result<Vec<(u32, String, Option<String>)>>> + Send {
        Kernel::links(self)
    }
    fn del_host_route(&self, dst: IpNet, oif: u32) -> impl Future<Output = Result<()>> + Send {
        Kernel::del_host_route(self, dst, oif)
    }
    fn export_block(&self, block: IpNet) -> impl Future<Output = Result<()>> + Send {
        Kernel::export_block(self, block)
    }
    fn withdraw_block(&self, block: IpNet) -> impl Future<Output = Result<()>> + Send {
        Kernel::withdraw_block(self, block)
    }
    fn exported_blocks(&self) -> impl Future<Output = Result<Vec<IpNet>>> + Send {
        Kernel::exported_blocks(self)
    }
    fn host_routes(&self) -> impl Future<Output = Result<Vec<(IpNet, u32)>>> + Send {
        Kernel::host_routes(self)
    }
    fn check(&self, w: &WireSpec) -> impl Future<Output = Result<Vec<String>>> + Send {
        Kernel::check(self, w)
    }
}
