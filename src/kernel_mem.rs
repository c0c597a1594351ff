//! An in-memory model of the kernel state coil manages: pod network
//! namespaces, host veths (index, alias, up, doomed), pod interfaces with
//! their addresses and default routes, host routes to pods, and the blocks
//! published in table 119. It implements [`KernelOps`] with the behaviour
//! the rtnetlink adapter has (a wire replaces a half-done host veth of the
//! same name and refuses a pod interface name already taken; deleting a
//! netns takes its veths with it; a reboot forgets everything), so coild's
//! driver and recovery run in-process without root, and recovery can be
//! timed on 100,000 attachments without creating 100,000 veths.
//!
//! Clones share one state: a test keeps a clone while the daemon owns
//! another, and the kernel outlives a daemon "killed" by dropping its
//! runtime, as the real kernel outlives coild.
//!
//! What it does not model: MAC addresses (made up from the link index),
//! MTU, link-local routes, the rtnl lock's timing.

use std::collections::{BTreeMap, BTreeSet};
use std::future::{ready, Future};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::IpNet;

use crate::kernel::{KernelError, KernelOps, WireSpec, Wired};

type Result<T, E = KernelError> = std::result::Result<T, E>;

#[derive(Debug, Clone)]
struct HostLink {
    index: u32,
    alias: Option<String>,
    up: bool,
    doomed: bool,
    /// Where its peer is: the pod's netns path and interface name.
    netns: String,
    ifname: String,
}

#[derive(Debug, Clone, Default)]
struct PodIface {
    /// Index of the host end (None: not a coil veth, e.g. a test's dummy).
    peer: Option<u32>,
    addresses: Vec<IpAddr>,
    default_v4: bool,
    default_v6: bool,
}

#[derive(Debug, Default)]
struct State {
    next_index: u32,
    /// Pod network namespaces by path, with their interfaces by name.
    netns: BTreeMap<String, BTreeMap<String, PodIface>>,
    /// Host ends by name.
    links: BTreeMap<String, HostLink>,
    /// Host routes to pods (main table, coil's protocol): destination and
    /// output interface.
    host_routes: BTreeMap<IpNet, u32>,
    /// Blocks in table 119.
    exported: BTreeSet<IpNet>,
    /// Wires still to fail (fault injection), and how many calls so far.
    fail_wires: u32,
    /// Wires still to finish and then report a timeout (fault injection).
    late_wires: u32,
    calls: u64,
}

/// The in-memory kernel (see the module docs).
#[derive(Debug, Clone)]
pub struct MemKernel {
    table: u32,
    st: Arc<Mutex<State>>,
}

impl Default for MemKernel {
    fn default() -> Self {
        MemKernel::new(119)
    }
}

fn host_prefix(a: &IpAddr) -> u8 {
    if a.is_ipv4() {
        32
    } else {
        128
    }
}

fn host_net(a: &IpAddr) -> IpNet {
    IpNet::new(*a, host_prefix(a)).unwrap_or_else(|_| IpNet::from(*a))
}

fn mac(index: u32, pod: bool) -> String {
    let b = index.to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        u8::from(pod),
        b[0],
        b[1],
        b[2],
        b[3]
    )
}

impl State {
    /// Removes a host link, its host routes and its pod end.
    fn remove_link(&mut self, name: &str) -> bool {
        let Some(l) = self.links.remove(name) else {
            return false;
        };
        self.host_routes.retain(|_, oif| *oif != l.index);
        if let Some(ifaces) = self.netns.get_mut(&l.netns) {
            if ifaces
                .get(&l.ifname)
                .is_some_and(|i| i.peer == Some(l.index))
            {
                ifaces.remove(&l.ifname);
            }
        }
        true
    }
}

impl MemKernel {
    /// An empty kernel publishing blocks in `table`.
    pub fn new(table: u32) -> MemKernel {
        MemKernel {
            table,
            st: Arc::new(Mutex::new(State {
                next_index: 10,
                ..State::default()
            })),
        }
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A pod network namespace appears (the runtime created it).
    pub fn add_netns(&self, path: &str) {
        self.st().netns.entry(path.to_string()).or_default();
    }

    /// A pod network namespace is deleted: its interfaces go, and with each
    /// veth end its peer, the host end, and that end's routes.
    pub fn remove_netns(&self, path: &str) {
        let mut st = self.st();
        st.netns.remove(path);
        let gone: Vec<String> = st
            .links
            .iter()
            .filter(|(_, l)| l.netns == path)
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            st.remove_link(&n);
        }
    }

    /// The node rebooted: every netns, link and route is gone.
    pub fn reboot(&self) {
        let mut st = self.st();
        st.netns.clear();
        st.links.clear();
        st.host_routes.clear();
        st.exported.clear();
    }

    /// The next `n` wires fail (as a kernel error would), leaving nothing.
    pub fn fail_next_wires(&self, n: u32) {
        self.st().fail_wires = n;
    }

    /// The interface index of a host veth (a replaced veth gets a new one).
    pub fn link_index(&self, host_veth: &str) -> Option<u32> {
        self.st().links.get(host_veth).map(|l| l.index)
    }

    /// The next `n` wires finish, then report a timeout: the caller sees
    /// a deadline pass although the wiring is complete.
    pub fn time_out_next_wires(&self, n: u32) {
        self.st().late_wires = n;
    }

    /// Puts an interface of `ifname` into a pod netns by hand (a test's
    /// conflicting interface).
    pub fn add_foreign_iface(&self, path: &str, ifname: &str) {
        self.st()
            .netns
            .entry(path.to_string())
            .or_default()
            .insert(ifname.to_string(), PodIface::default());
    }

    /// Deletes a host route by hand (drift a CHECK or recovery must see).
    pub fn drop_host_route(&self, dst: IpNet) {
        self.st().host_routes.remove(&dst);
    }

    /// Deletes a host veth by hand, as `ip link del` would.
    pub fn drop_link(&self, host_veth: &str) -> bool {
        self.st().remove_link(host_veth)
    }

    /// The addresses on `ifname` in `netns` (None: no such interface).
    pub fn pod_addresses(&self, netns: &str, ifname: &str) -> Option<Vec<IpAddr>> {
        self.st()
            .netns
            .get(netns)
            .and_then(|i| i.get(ifname))
            .map(|i| i.addresses.clone())
    }

    /// Names of the host links, doomed ones included.
    pub fn link_names(&self) -> Vec<String> {
        self.st().links.keys().cloned().collect()
    }

    /// Every pod address held by a live (not doomed) coil veth, with the
    /// host veth holding it.
    pub fn wired_addresses(&self) -> Vec<(IpAddr, String)> {
        let st = self.st();
        let mut out = Vec::new();
        for (name, l) in st.links.iter().filter(|(_, l)| !l.doomed) {
            if let Some(i) = st.netns.get(&l.netns).and_then(|i| i.get(&l.ifname)) {
                if i.peer == Some(l.index) {
                    out.extend(i.addresses.iter().map(|a| (*a, name.clone())));
                }
            }
        }
        out
    }

    /// Kernel calls made so far.
    pub fn calls(&self) -> u64 {
        self.st().calls
    }

    fn wire_now(&self, w: &WireSpec) -> Result<Wired> {
        let index = self.prepare_now(w)?;
        self.finish_now(w, index)
    }

    /// The links, without the pod's addresses; the host veth's index.
    fn prepare_now(&self, w: &WireSpec) -> Result<u32> {
        let mut st = self.st();
        st.calls += 1;
        if !st.netns.contains_key(&w.netns) {
            return Err(KernelError::NetnsMissing(w.netns.clone()));
        }
        // A half-done earlier attempt of this attachment is replaced.
        st.remove_link(&w.host_veth);
        if st
            .netns
            .get(&w.netns)
            .is_some_and(|i| i.contains_key(&w.ifname))
        {
            return Err(KernelError::InterfaceExists {
                ifname: w.ifname.clone(),
                netns: w.netns.clone(),
            });
        }
        if st.fail_wires > 0 {
            st.fail_wires -= 1;
            return Err(KernelError::Io(format!(
                "injected failure wiring {}",
                w.host_veth
            )));
        }
        st.next_index += 1;
        let index = st.next_index;
        st.links.insert(
            w.host_veth.clone(),
            HostLink {
                index,
                alias: Some(w.alias.clone()),
                up: true,
                doomed: false,
                netns: w.netns.clone(),
                ifname: w.ifname.clone(),
            },
        );
        let iface = PodIface {
            peer: Some(index),
            addresses: Vec::new(),
            default_v4: w.addresses.iter().any(IpAddr::is_ipv4),
            default_v6: w.addresses.iter().any(IpAddr::is_ipv6),
        };
        if let Some(ifaces) = st.netns.get_mut(&w.netns) {
            ifaces.insert(w.ifname.clone(), iface);
        }
        Ok(index)
    }

    /// The pod's addresses and the host routes to them.
    fn finish_now(&self, w: &WireSpec, index: u32) -> Result<Wired> {
        let mut st = self.st();
        let ours = st
            .netns
            .get_mut(&w.netns)
            .and_then(|i| i.get_mut(&w.ifname))
            .filter(|i| i.peer == Some(index));
        let Some(iface) = ours else {
            // Nothing half-built is left behind.
            st.remove_link(&w.host_veth);
            return Err(KernelError::Io(format!(
                "{} vanished from {} before its addresses",
                w.ifname, w.netns
            )));
        };
        iface.addresses = w.addresses.clone();
        for a in &w.addresses {
            st.host_routes.insert(host_net(a), index);
        }
        if st.late_wires > 0 {
            st.late_wires -= 1;
            return Err(KernelError::Timeout(
                format!("wiring {}", w.host_veth),
                std::time::Duration::from_secs(15),
            ));
        }
        Ok(Wired {
            host_mac: mac(index, false),
            pod_mac: mac(index, true),
        })
    }

    fn check_now(&self, w: &WireSpec) -> Vec<String> {
        let mut st = self.st();
        st.calls += 1;
        let mut diffs = Vec::new();
        let Some(host) = st.links.get(&w.host_veth).cloned() else {
            diffs.push(format!("host veth {} is missing", w.host_veth));
            return diffs;
        };
        if host.alias.as_deref() != Some(w.alias.as_str()) {
            diffs.push(format!("host veth {} lacks alias {}", w.host_veth, w.alias));
        }
        if !host.up {
            diffs.push(format!("host veth {} is down", w.host_veth));
        }
        for a in &w.addresses {
            let want = host_net(a);
            if st.host_routes.get(&want) != Some(&host.index) {
                diffs.push(format!(
                    "host route to {want} via {} is missing",
                    w.host_veth
                ));
            }
        }
        let Some(ifaces) = st.netns.get(&w.netns) else {
            diffs.push(format!("netns {} is gone", w.netns));
            return diffs;
        };
        let Some(pod) = ifaces.get(&w.ifname) else {
            diffs.push(format!("{} is missing in {}", w.ifname, w.netns));
            return diffs;
        };
        for a in &w.addresses {
            if !pod.addresses.contains(a) {
                diffs.push(format!("{a} is missing on {} in {}", w.ifname, w.netns));
            }
        }
        if w.addresses.iter().any(IpAddr::is_ipv4) && !pod.default_v4 {
            diffs.push(format!(
                "default route via 169.254.1.1 is missing in {}",
                w.netns
            ));
        }
        if w.addresses.iter().any(IpAddr::is_ipv6) && !pod.default_v6 {
            diffs.push(format!(
                "default route via fe80::1 is missing in {}",
                w.netns
            ));
        }
        diffs
    }
}

impl KernelOps for MemKernel {
    type Netns = String;
    type Prepared = u32;

    fn table(&self) -> u32 {
        self.table
    }

    fn open_pod_netns(&self, path: &str) -> impl Future<Output = Result<String>> + Send {
        let st = self.st();
        ready(if st.netns.contains_key(path) {
            Ok(path.to_string())
        } else {
            Err(KernelError::NetnsMissing(path.to_string()))
        })
    }

    fn live_netns(&self, paths: Vec<String>) -> impl Future<Output = BTreeSet<String>> + Send {
        let st = self.st();
        ready(
            paths
                .into_iter()
                .filter(|p| st.netns.contains_key(p))
                .collect(),
        )
    }

    fn names_of(&self, indexes: &[u32]) -> impl Future<Output = Result<Vec<(u32, String)>>> + Send {
        let st = self.st();
        ready(Ok(st
            .links
            .iter()
            .filter(|(_, l)| indexes.contains(&l.index))
            .map(|(n, l)| (l.index, n.clone()))
            .collect()))
    }

    fn wire(&self, w: &WireSpec) -> impl Future<Output = Result<Wired>> + Send {
        ready(self.wire_now(w))
    }

    fn wire_in(
        &self,
        w: &WireSpec,
        _ns: Option<String>,
    ) -> impl Future<Output = Result<Wired>> + Send {
        ready(self.wire_now(w))
    }

    fn prepare_in(
        &self,
        w: &WireSpec,
        _ns: Option<String>,
    ) -> impl Future<Output = Result<u32>> + Send {
        ready(self.prepare_now(w))
    }

    fn finish_in(&self, w: &WireSpec, index: u32) -> impl Future<Output = Result<Wired>> + Send {
        ready(self.finish_now(w, index))
    }

    fn wire_after(
        &self,
        w: WireSpec,
        _ns: Option<String>,
        durable: impl Future<Output = bool> + Send + 'static,
    ) -> impl Future<Output = Result<Wired>> + Send + 'static {
        let prepared = self.prepare_now(&w);
        let k = self.clone();
        async move {
            let index = prepared?;
            if durable.await {
                k.finish_now(&w, index)
            } else {
                k.unwire(&w.host_veth).await?;
                Err(crate::kernel::abandoned(&w))
            }
        }
    }

    fn wire_info(&self, w: &WireSpec) -> impl Future<Output = Result<Wired>> + Send {
        let st = self.st();
        let r = match st.links.get(&w.host_veth) {
            None => Err(KernelError::Io(format!(
                "host veth {} is missing",
                w.host_veth
            ))),
            Some(l) => match st.netns.get(&w.netns) {
                None => Err(KernelError::NetnsMissing(w.netns.clone())),
                Some(i) if !i.contains_key(&w.ifname) => Err(KernelError::Io(format!(
                    "{} is missing in {}",
                    w.ifname, w.netns
                ))),
                Some(_) => Ok(Wired {
                    host_mac: mac(l.index, false),
                    pod_mac: mac(l.index, true),
                }),
            },
        };
        ready(r)
    }

    fn doom(
        &self,
        host_veth: &str,
        netns: &str,
        ifname: &str,
    ) -> impl Future<Output = Result<bool>> + Send {
        let mut st = self.st();
        st.calls += 1;
        let r = match st.links.get(host_veth).map(|l| l.index) {
            None => false,
            Some(index) => {
                // The pod end, if it is this veth's peer, leaves the pod's
                // view at once (renamed, down); it dies with the host end.
                if let Some(ifaces) = st.netns.get_mut(netns) {
                    if ifaces.get(ifname).is_some_and(|i| i.peer == Some(index)) {
                        ifaces.remove(ifname);
                    }
                }
                if let Some(l) = st.links.get_mut(host_veth) {
                    l.up = false;
                    l.doomed = true;
                }
                true
            }
        };
        ready(Ok(r))
    }

    fn delete_doomed(&self) -> impl Future<Output = Result<()>> + Send {
        let mut st = self.st();
        st.calls += 1;
        let doomed: Vec<String> = st
            .links
            .iter()
            .filter(|(_, l)| l.doomed)
            .map(|(n, _)| n.clone())
            .collect();
        for n in doomed {
            st.remove_link(&n);
        }
        ready(Ok(()))
    }

    fn unwire(&self, host_veth: &str) -> impl Future<Output = Result<bool>> + Send {
        let mut st = self.st();
        st.calls += 1;
        ready(Ok(st.remove_link(host_veth)))
    }

    fn links(&self) -> impl Future<Output = Result<Vec<(u32, String, Option<String>)>>> + Send {
        let st = self.st();
        let mut v: Vec<(u32, String, Option<String>)> = vec![(1, "lo".into(), None)];
        v.extend(
            st.links
                .iter()
                .map(|(n, l)| (l.index, n.clone(), l.alias.clone())),
        );
        ready(Ok(v))
    }

    fn del_host_route(&self, dst: IpNet, oif: u32) -> impl Future<Output = Result<()>> + Send {
        let mut st = self.st();
        st.calls += 1;
        if st.host_routes.get(&dst) == Some(&oif) {
            st.host_routes.remove(&dst);
        }
        ready(Ok(()))
    }

    fn export_block(&self, block: IpNet) -> impl Future<Output = Result<()>> + Send {
        let mut st = self.st();
        st.calls += 1;
        st.exported.insert(block);
        ready(Ok(()))
    }

    fn withdraw_block(&self, block: IpNet) -> impl Future<Output = Result<()>> + Send {
        let mut st = self.st();
        st.calls += 1;
        st.exported.remove(&block);
        ready(Ok(()))
    }

    fn exported_blocks(&self) -> impl Future<Output = Result<Vec<IpNet>>> + Send {
        ready(Ok(self.st().exported.iter().copied().collect()))
    }

    fn host_routes(&self) -> impl Future<Output = Result<Vec<(IpNet, u32)>>> + Send {
        ready(Ok(self
            .st()
            .host_routes
            .iter()
            .map(|(d, i)| (*d, *i))
            .collect()))
    }

    fn check(&self, w: &WireSpec) -> impl Future<Output = Result<Vec<String>>> + Send {
        ready(Ok(self.check_now(w)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cid: &str, addrs: &[&str]) -> WireSpec {
        WireSpec {
            netns: format!("/run/netns/{cid}"),
            ifname: "eth0".into(),
            host_veth: format!("coil{cid}"),
            alias: format!("coil:eth0:k8s:{cid}"),
            addresses: addrs.iter().map(|a| a.parse().expect("ip")).collect(),
            mtu: 1500,
        }
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn wiring_behaves_like_the_kernel() {
        block_on(async {
            let k = MemKernel::default();
            let w = spec("a", &["10.0.0.1", "fd00::1"]);
            // No netns: NetnsMissing, nothing made.
            assert!(matches!(
                k.wire(&w).await,
                Err(KernelError::NetnsMissing(_))
            ));
            assert!(k.link_names().is_empty());
            k.add_netns(&w.netns);
            let got = k.wire(&w).await.expect("wire");
            assert!(k.check(&w).await.expect("check").is_empty());
            assert_eq!(k.wire_info(&w).await.expect("info"), got);
            assert_eq!(k.host_routes().await.expect("routes").len(), 2);
            // A second attachment may not take the pod's interface name.
            let mut other = spec("b", &["10.0.0.2"]);
            other.netns = w.netns.clone();
            assert!(matches!(
                k.wire(&other).await,
                Err(KernelError::InterfaceExists { .. })
            ));
            // Wiring again replaces the half-done host veth.
            k.wire(&w).await.expect("rewire");
            assert_eq!(k.link_names(), vec!["coila".to_string()]);
            // Drift is reported.
            k.drop_host_route("fd00::1/128".parse().expect("net"));
            let d = k.check(&w).await.expect("check");
            assert_eq!(d.len(), 1, "{d:?}");
            // Doomed: out of the pod at once, gone after delete_doomed.
            assert!(k.doom("coila", &w.netns, "eth0").await.expect("doom"));
            assert_eq!(k.pod_addresses(&w.netns, "eth0"), None);
            assert_eq!(k.link_names().len(), 1);
            k.delete_doomed().await.expect("delete");
            assert!(k.link_names().is_empty());
            assert!(k.host_routes().await.expect("routes").is_empty());
            assert!(!k.unwire("coila").await.expect("unwire"));
        });
    }

    #[test]
    fn a_deleted_netns_takes_its_veths_and_a_reboot_everything() {
        block_on(async {
            let k = MemKernel::default();
            let (a, b) = (spec("a", &["10.0.0.1"]), spec("b", &["10.0.0.2"]));
            for w in [&a, &b] {
                k.add_netns(&w.netns);
                k.wire(w).await.expect("wire");
            }
            k.export_block("10.0.0.0/28".parse().expect("net"))
                .await
                .expect("export");
            k.remove_netns(&a.netns);
            assert_eq!(k.link_names(), vec!["coilb".to_string()]);
            assert_eq!(
                k.live_netns(vec![a.netns.clone(), b.netns.clone()]).await,
                [b.netns.clone()].into_iter().collect()
            );
            k.fail_next_wires(1);
            k.add_netns(&a.netns);
            assert!(k.wire(&a).await.is_err());
            assert_eq!(k.link_names(), vec!["coilb".to_string()]);
            k.reboot();
            assert!(k.link_names().is_empty());
            assert!(k.exported_blocks().await.expect("blocks").is_empty());
        });
    }
}
