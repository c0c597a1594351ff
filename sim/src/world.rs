//! The simulated cluster: a store model, nodes running the real node
//! machine ([`coil::machine::NodeMachine`]) with a journal model and a
//! kernel model, a container runtime per node, and the controller's real
//! removal rule ([`coil::removal`]). Single-threaded; time is a counter.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use rand::rngs::StdRng;
use rand::Rng;

use coil::errors::ErrorKind;
use coil::journal::{AttachmentKey, BlockLease, LeaseState};
use coil::machine::{
    Answer, Durable, Effect, EffectId, MachineConfig, NodeMachine, Outcome, Output, Rec, ReqId,
    Request,
};
use coil::node::{host_veth_name, veth_alias};
use coil::store::model::Family;
use coil::store::NodeStatus;

/// Seconds a node's liveness lasts without a keep-alive.
pub const LIVENESS_TTL: u64 = 30;
/// Nodes in the cluster at any time.
pub const NODES: usize = 4;
/// The one pool's name.
pub const POOL: &str = "default";
/// The CNI networks pods are attached to.
pub const NETWORKS: [&str; 2] = ["k8s-pod-network", "macvlan-net"];

/// A block key in the store model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreLease {
    pub node: String,
    pub pool: String,
    pub epoch: u64,
}

/// The cluster store, linearizable: every call is applied at once, in
/// step order.
#[derive(Debug, Default)]
pub struct Store {
    pub blocks: BTreeMap<IpNet, StoreLease>,
    /// Every block of the pool, per family.
    pub all: BTreeMap<Family, Vec<IpNet>>,
    pub revision: u64,
    /// Node -> when its liveness expires.
    pub liveness: BTreeMap<String, u64>,
    /// Removal fences.
    pub fences: BTreeSet<String>,
    /// The controller leader: (controller, term, lease expiry).
    pub leader: Option<(usize, u64, u64)>,
}

/// Seconds a controller's leadership lasts without renewal.
pub const LEADER_TTL: u64 = 15;

/// One of the two controller replicas.
#[derive(Debug, Default, Clone)]
pub struct Controller {
    pub up: bool,
    /// Nodes to remove, decided from a view read in the given term, not
    /// written yet.
    pub decided: Option<(u64, Vec<String>)>,
}

/// One host veth in a node's kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Veth {
    pub key: AttachmentKey,
    pub netns: String,
    pub addrs: Vec<IpAddr>,
}

/// An effect the machine asked for, as the driver holds it.
#[derive(Debug, Clone)]
pub struct Fx {
    pub id: EffectId,
    pub effect: Effect,
    /// Set once the effect has run against the world; delivered later.
    pub outcome: Option<Outcome>,
}

/// A node: coild's machine when it runs, its journal, its kernel.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub boot: u64,
    /// The boot the journal's node record names: coild records a new boot
    /// only once the store confirmed the leases (durable; a node whose
    /// record names an older boot starts unconfirmed).
    pub meta_boot: u64,
    pub machine: Option<NodeMachine>,
    /// What the journal has made durable.
    pub durable: Durable,
    /// Batches written but not yet synced (a power cut may lose a suffix).
    pub unsynced: Vec<Vec<Rec>>,
    pub effects: Vec<Fx>,
    pub kernel: BTreeMap<String, Veth>,
    /// Table 119: the blocks this node publishes.
    pub table: BTreeSet<IpNet>,
    /// Pod network namespaces that exist.
    pub netns: BTreeSet<String>,
    pub partitioned: bool,
    /// Requests in flight: request id -> pod key.
    pub requests: BTreeMap<ReqId, (AttachmentKey, Kind)>,
}

/// What a request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Add,
    Del,
    Check,
    Gc,
}

/// A pod as the container runtime sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// ADD sent, no answer yet.
    Adding,
    /// ADD answered with these addresses: they must stay wired until DEL.
    Running(Vec<IpAddr>),
    /// DEL sent (the runtime forgets the pod when it is answered).
    Deleting,
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub node: usize,
    pub key: AttachmentKey,
    pub netns: String,
    pub state: PodState,
    /// The node's boot when the pod was created.
    pub boot: u64,
    /// Its netns was deleted (the pod died): nothing of it need stay.
    pub dead: bool,
    /// Its veth was deleted by hand (the pod lives): coild must rebuild it
    /// (checked when the run settles).
    pub drifted: bool,
    /// Its last ADD failed and no DEL was sent since: the runtime may
    /// send the same ADD again (a retry, same container id).
    pub add_failed: bool,
}

/// The whole simulated cluster.
#[derive(Debug)]
pub struct World {
    pub now: u64,
    pub store: Store,
    pub nodes: Vec<Node>,
    /// Nodes the Kubernetes API lists (a decommissioned node is deleted).
    pub kube: BTreeSet<String>,
    pub pods: BTreeMap<AttachmentKey, Pod>,
    pub next_req: ReqId,
    pub next_pod: u64,
    pub next_node: u64,
    /// Crash-restarts of coild (kills and reboots).
    pub crashes: u64,
    /// Links left behind by kills (see [`World::kill_leaving`]).
    pub orphans: u64,
    pub trace: Vec<String>,
    /// Families pods ask for.
    pub families: Vec<Family>,
    pub min_blocks: usize,
    pub controllers: [Controller; 2],
}

fn v4(s: &str) -> IpNet {
    s.parse()
        .unwrap_or_else(|_| IpNet::from(IpAddr::from([0, 0, 0, 0])))
}

impl World {
    /// A cluster of [`NODES`] nodes with a dual-stack pool of 6 blocks of
    /// 4 addresses per family (small, so exhaustion and reuse come fast).
    pub fn new() -> World {
        let mut store = Store::default();
        let v4s: Vec<IpNet> = (0..6)
            .map(|i| v4(&format!("10.0.0.{}/30", i * 4)))
            .collect();
        let v6s: Vec<IpNet> = (0..6)
            .map(|i| v4(&format!("fd00::{:x}/126", i * 4)))
            .collect();
        store.all.insert(Family::Ipv4, v4s);
        store.all.insert(Family::Ipv6, v6s);
        let mut w = World {
            now: 0,
            store,
            nodes: Vec::new(),
            kube: BTreeSet::new(),
            pods: BTreeMap::new(),
            next_req: 1,
            next_pod: 1,
            next_node: 1,
            crashes: 0,
            orphans: 0,
            trace: Vec::new(),
            families: vec![Family::Ipv4, Family::Ipv6],
            min_blocks: 1,
            controllers: [
                Controller {
                    up: true,
                    decided: None,
                },
                Controller {
                    up: true,
                    decided: None,
                },
            ],
        };
        for _ in 0..NODES {
            w.join();
        }
        w
    }

    /// A new node joins: registered with Kubernetes, coild started.
    pub fn join(&mut self) -> usize {
        let name = format!("node{}", self.next_node);
        self.next_node += 1;
        self.kube.insert(name.clone());
        self.nodes.push(Node {
            name,
            boot: 1,
            meta_boot: 1,
            machine: None,
            durable: Durable::default(),
            unsynced: Vec::new(),
            effects: Vec::new(),
            kernel: BTreeMap::new(),
            table: BTreeSet::new(),
            netns: BTreeSet::new(),
            partitioned: false,
            requests: BTreeMap::new(),
        });
        let i = self.nodes.len() - 1;
        self.start(i);
        i
    }

    fn cfg(&self, i: usize) -> MachineConfig {
        MachineConfig {
            node: self.nodes[i].name.clone(),
            boot_id: format!("boot{}", self.nodes[i].boot),
            min_blocks: self.min_blocks,
            mtu: 1500,
        }
    }

    /// Starts coild on node `i` from its durable journal.
    pub fn start(&mut self, i: usize) {
        let n = &self.nodes[i];
        let durable = Durable {
            rebooted: n.meta_boot != n.boot,
            ..n.durable.clone()
        };
        let (m, out) = NodeMachine::start(self.cfg(i), &durable);
        if coil::planted::on(coil::planted::Bug::BootRecordedAtStart) {
            // Planted (tests only): the boot recorded before confirmation.
            self.nodes[i].meta_boot = self.nodes[i].boot;
        }
        self.nodes[i].machine = Some(m);
        self.keep_alive(i);
        self.apply(i, out);
    }

    /// coild on node `i` dies (kill -9): volatile state is gone; unsynced
    /// batches survive as a prefix (`keep` of them), the rest is lost.
    pub fn kill(&mut self, i: usize, keep: usize) {
        self.kill_leaving(i, keep, false);
    }

    /// [`World::kill`]; with `leave_prepared`, the links coild had made
    /// for ADDs whose reservation was not durable yet stay behind (the
    /// driver makes a fresh pod's links while its batch syncs): veths no
    /// record owns, with no address, which coild must find and remove.
    pub fn kill_leaving(&mut self, i: usize, keep: usize, leave_prepared: bool) {
        let adding: Vec<(AttachmentKey, String)> = self.nodes[i]
            .requests
            .values()
            .filter(|(_, kind)| *kind == Kind::Add)
            .map(|(k, _)| {
                let netns = self.pods.get(k).map(|p| p.netns.clone());
                (k.clone(), netns.unwrap_or_default())
            })
            .collect();
        let mut left = 0;
        let n = &mut self.nodes[i];
        n.machine = None;
        n.effects.clear();
        let unsynced = std::mem::take(&mut n.unsynced);
        for b in unsynced.into_iter().take(keep) {
            for r in &b {
                n.durable.apply(r);
            }
        }
        if leave_prepared {
            for (key, netns) in adding {
                let name = host_veth_name(&key);
                if n.durable.attachments.contains_key(&key) || n.kernel.contains_key(&name) {
                    continue;
                }
                n.kernel.insert(
                    name,
                    Veth {
                        key,
                        netns,
                        addrs: Vec::new(),
                    },
                );
                left += 1;
            }
        }
        self.orphans += left;
        // Requests in flight die with coild: the runtime sees errors.
        let reqs = std::mem::take(&mut n.requests);
        for (_, (key, kind)) in reqs {
            self.runtime_failed(&key, kind);
        }
        self.crashes += 1;
    }

    /// Node `i` reboots: coild dies, the kernel and every pod netns are
    /// gone, the boot id changes, and the runtime's pods there are dead.
    pub fn reboot(&mut self, i: usize, keep: usize) {
        if self.nodes[i].machine.is_some() {
            self.kill(i, keep);
        } else {
            self.crashes += 1;
        }
        let n = &mut self.nodes[i];
        n.kernel.clear();
        n.table.clear();
        n.netns.clear();
        n.boot += 1;
        self.pods.retain(|_, p| p.node != i);
        self.start(i);
    }

    /// The node's pods are gone for good and its Node object is deleted.
    pub fn decommission(&mut self, i: usize) {
        if self.nodes[i].machine.is_some() {
            self.kill(i, 0);
        }
        let n = &mut self.nodes[i];
        n.kernel.clear();
        n.table.clear();
        n.netns.clear();
        n.partitioned = true;
        self.kube.remove(&n.name.clone());
        self.pods.retain(|_, p| p.node != i);
    }

    /// Is node `i` part of the cluster (not decommissioned)?
    pub fn member(&self, i: usize) -> bool {
        self.kube.contains(&self.nodes[i].name)
    }

    fn keep_alive(&mut self, i: usize) {
        let n = &self.nodes[i];
        if n.machine.is_some() && !n.partitioned {
            self.store
                .liveness
                .insert(n.name.clone(), self.now + LIVENESS_TTL);
        }
    }

    /// Time passes: liveness of nodes that cannot renew it expires.
    pub fn advance(&mut self, secs: u64) {
        self.now += secs;
        for i in 0..self.nodes.len() {
            self.keep_alive(i);
        }
        let now = self.now;
        self.store.liveness.retain(|_, until| *until > now);
    }

    /// Carries out a machine output on node `i`: persist, then effects,
    /// then answers.
    pub fn apply(&mut self, i: usize, out: Output) {
        let Output {
            persist,
            sync,
            effects,
            answers,
        } = out;
        let n = &mut self.nodes[i];
        if !persist.is_empty() {
            let planted = coil::planted::on(coil::planted::Bug::WireBeforeIntent);
            if sync && !planted {
                // fdatasync: this batch and every one before it.
                for b in std::mem::take(&mut n.unsynced) {
                    for r in &b {
                        n.durable.apply(r);
                    }
                }
                for r in &persist {
                    n.durable.apply(r);
                }
            } else {
                n.unsynced.push(persist);
            }
        }
        for (id, effect) in effects {
            n.effects.push(Fx {
                id,
                effect,
                outcome: None,
            });
        }
        // The driver records this boot once the store confirmed it.
        let n = &mut self.nodes[i];
        if n.machine.as_ref().is_some_and(|m| !m.unconfirmed()) {
            n.meta_boot = n.boot;
        }
        for (req, a) in answers {
            if let Some((key, kind)) = self.nodes[i].requests.remove(&req) {
                self.runtime_answer(i, &key, kind, a);
            }
        }
    }

    /// A decommissioned node comes back with its journal (powered on
    /// again; its kubelet re-registers the Node): a new boot, maybe still
    /// cut off from the store. If the controller removed it meanwhile, its
    /// blocks may be another node's now and it must serve none of them.
    pub fn come_back(&mut self, i: usize, partitioned: bool) {
        let n = &mut self.nodes[i];
        n.boot += 1;
        n.partitioned = partitioned;
        self.kube.insert(n.name.clone());
        self.start(i);
    }

    /// Sends a request to node `i`'s coild.
    pub fn request(&mut self, i: usize, key: AttachmentKey, kind: Kind, r: Request) -> bool {
        let req = self.next_req;
        self.next_req += 1;
        let Some(m) = self.nodes[i].machine.as_mut() else {
            self.runtime_failed(&key, kind);
            return false;
        };
        let out = m.request(req, r);
        self.nodes[i].requests.insert(req, (key, kind));
        self.apply(i, out);
        true
    }

    /// Runs effect `k` of node `i` against the world (its outcome is
    /// delivered by a later step), `ambiguous` makes a store write that
    /// was applied answer Unavailable, as a timed-out etcd write does.
    pub fn run_effect(&mut self, i: usize, k: usize, rng: &mut StdRng) {
        let fx = self.nodes[i].effects[k].clone();
        let node = self.nodes[i].name.clone();
        let partitioned = self.nodes[i].partitioned;
        let fenced = self.store.fences.contains(&node);
        let ambiguous = rng.gen_bool(0.05);
        let outcome = match &fx.effect {
            Effect::View { full } => {
                if partitioned {
                    Outcome::Unavailable
                } else {
                    // A narrow view, as coild reads it: only the blocks the
                    // node knows when it asked.
                    let known: Option<BTreeSet<IpNet>> = match (full, &self.nodes[i].machine) {
                        (false, Some(m)) => {
                            Some(m.state().blocks().map(|b| b.lease.block).collect())
                        }
                        _ => None,
                    };
                    Outcome::View {
                        leases: self
                            .store
                            .blocks
                            .iter()
                            .filter(|(_, l)| l.node == node)
                            .filter(|(b, _)| known.as_ref().is_none_or(|k| k.contains(b)))
                            .map(|(b, l)| (*b, (l.pool.clone(), l.epoch)))
                            .collect(),
                        fenced,
                    }
                }
            }
            Effect::Acquire { pool, family } => {
                if partitioned {
                    Outcome::Unavailable
                } else if fenced {
                    Outcome::Fenced
                } else {
                    let free: Vec<IpNet> = self
                        .store
                        .all
                        .get(family)
                        .map(|v| {
                            v.iter()
                                .filter(|b| !self.store.blocks.contains_key(b))
                                .copied()
                                .collect()
                        })
                        .unwrap_or_default();
                    if free.is_empty() {
                        Outcome::Exhausted
                    } else {
                        let b = free[rng.gen_range(0..free.len())];
                        self.store.revision += 1;
                        let epoch = self.store.revision;
                        self.store.blocks.insert(
                            b,
                            StoreLease {
                                node: node.clone(),
                                pool: pool.clone(),
                                epoch,
                            },
                        );
                        if ambiguous {
                            Outcome::Unavailable
                        } else {
                            Outcome::Acquired(BlockLease {
                                pool: pool.clone(),
                                block: b,
                                epoch,
                                state: LeaseState::Leased,
                                alloc_cursor: 0,
                            })
                        }
                    }
                }
            }
            Effect::Reacquire { lease } => {
                if partitioned {
                    Outcome::Unavailable
                } else if fenced {
                    Outcome::Fenced
                } else {
                    match self.store.blocks.get(&lease.block) {
                        Some(l) if l.node == node => Outcome::Acquired(BlockLease {
                            epoch: l.epoch,
                            ..lease.clone()
                        }),
                        Some(l) => Outcome::Taken {
                            owner: l.node.clone(),
                        },
                        None => {
                            self.store.revision += 1;
                            let epoch = self.store.revision;
                            self.store.blocks.insert(
                                lease.block,
                                StoreLease {
                                    node: node.clone(),
                                    pool: lease.pool.clone(),
                                    epoch,
                                },
                            );
                            Outcome::Acquired(BlockLease {
                                epoch,
                                ..lease.clone()
                            })
                        }
                    }
                }
            }
            Effect::Release { lease } => {
                if partitioned {
                    Outcome::Unavailable
                } else {
                    let ours = self
                        .store
                        .blocks
                        .get(&lease.block)
                        .is_some_and(|l| l.node == node && l.epoch == lease.epoch);
                    if ours {
                        self.store.blocks.remove(&lease.block);
                    }
                    if ours && ambiguous {
                        Outcome::Unavailable
                    } else {
                        Outcome::Released
                    }
                }
            }
            Effect::Wire { key, spec, .. } => {
                let n = &mut self.nodes[i];
                let complete = n.kernel.get(&spec.host_veth).is_some_and(|v| {
                    v.key == *key && v.netns == spec.netns && v.addrs == spec.addresses
                });
                if !n.netns.contains(&spec.netns) {
                    Outcome::WireFailed(
                        ErrorKind::NetnsMissing,
                        format!("netns {} is gone", spec.netns),
                    )
                } else if complete {
                    // Create-or-verify: a complete wiring of this very
                    // attachment is the wire's result.
                    Outcome::Wired
                } else if rng.gen_bool(0.03) {
                    // A failed wire leaves nothing of that name behind
                    // (the adapter replaces a half-done veth, and cleans
                    // up what it created).
                    n.kernel.remove(&spec.host_veth);
                    Outcome::WireFailed(ErrorKind::Kernel, "the kernel refused".into())
                } else {
                    n.kernel.insert(
                        spec.host_veth.clone(),
                        Veth {
                            key: key.clone(),
                            netns: spec.netns.clone(),
                            addrs: spec.addresses.clone(),
                        },
                    );
                    if rng.gen_bool(0.02) {
                        Outcome::WireTimedOut
                    } else {
                        Outcome::Wired
                    }
                }
            }
            Effect::Unwire { host_veth, .. } => {
                self.nodes[i].kernel.remove(host_veth);
                Outcome::Unwired
            }
            Effect::Export { block } => {
                self.nodes[i].table.insert(*block);
                Outcome::Routed
            }
            Effect::Withdraw { block } => {
                self.nodes[i].table.remove(block);
                Outcome::Routed
            }
            Effect::ReadTable => Outcome::Table(self.nodes[i].table.clone()),
            Effect::Observe { attachments } => {
                let n = &self.nodes[i];
                Outcome::Observed(
                    attachments
                        .iter()
                        .filter(|a| {
                            let addrs: Vec<IpAddr> = a.addresses.iter().map(|x| x.addr).collect();
                            !n.kernel.get(&a.host_veth).is_some_and(|v| {
                                v.key == a.key && v.netns == a.netns && v.addrs == addrs
                            })
                        })
                        .map(|a| (a.key.clone(), n.netns.contains(&a.netns)))
                        .collect(),
                )
            }
            Effect::Scan => {
                let n = &self.nodes[i];
                Outcome::Scanned {
                    links: n
                        .kernel
                        .iter()
                        .map(|(name, v)| (name.clone(), Some(veth_alias(&v.key))))
                        .collect(),
                    routes: n
                        .kernel
                        .iter()
                        .flat_map(|(name, v)| {
                            v.addrs.iter().map(|a| (IpNet::from(*a), name.clone(), 0))
                        })
                        .collect(),
                }
            }
            Effect::RemoveLink { name } => {
                self.nodes[i].kernel.remove(name);
                Outcome::Removed
            }
            Effect::RemoveHostRoute { dst, dev, .. } => {
                if let Some(v) = self.nodes[i].kernel.get_mut(dev) {
                    v.addrs.retain(|a| IpNet::from(*a) != *dst);
                }
                Outcome::Removed
            }
        };
        self.nodes[i].effects[k].outcome = Some(outcome);
    }

    /// Delivers the outcome of effect `k` of node `i` (it has run).
    pub fn deliver(&mut self, i: usize, k: usize) {
        let fx = self.nodes[i].effects.remove(k);
        let Some(outcome) = fx.outcome else {
            return;
        };
        if let Some(m) = self.nodes[i].machine.as_mut() {
            let out = m.done(fx.id, outcome);
            self.apply(i, out);
        }
    }

    /// A tick of node `i`'s coild.
    pub fn tick(&mut self, i: usize) {
        self.keep_alive(i);
        if let Some(m) = self.nodes[i].machine.as_mut() {
            let out = m.tick();
            self.apply(i, out);
        }
    }

    /// Controller `c` takes or renews leadership, reads the store and
    /// decides whom to remove; the write comes in a later step, when `c`
    /// may have been deposed.
    pub fn controller_decide(&mut self, c: usize) -> String {
        if !self.controllers[c].up {
            return format!("controller {c} is down");
        }
        let term = match self.store.leader {
            Some((l, t, until)) if l == c => {
                self.store.leader = Some((c, t, self.now + LEADER_TTL));
                let _ = until;
                t
            }
            Some((_, _, until)) if until > self.now => {
                return format!("controller {c} is not the leader");
            }
            other => {
                let t = other.map_or(1, |(_, t, _)| t + 1);
                self.store.leader = Some((c, t, self.now + LEADER_TTL));
                t
            }
        };
        let gone = self.removable();
        let what = format!("controller {c} (term {term}) decides to remove {gone:?}");
        self.controllers[c].decided = Some((term, gone));
        what
    }

    /// Controller `c` writes what it decided, fenced on its leadership.
    pub fn controller_write(&mut self, c: usize) -> String {
        let Some((term, gone)) = self.controllers[c].decided.take() else {
            return format!("controller {c} has nothing to write");
        };
        let leads = matches!(self.store.leader, Some((l, t, until)) if l == c && t == term && until > self.now);
        if !leads {
            return format!("controller {c}'s removal of {gone:?} refused: term {term} is over");
        }
        for n in &gone {
            self.remove_node(n);
        }
        format!("controller {c} removes {gone:?}")
    }

    /// A controller replica dies (its decision is lost; its leadership
    /// expires) or comes back.
    pub fn controller_toggle(&mut self, c: usize) -> String {
        let ctl = &mut self.controllers[c];
        ctl.up = !ctl.up;
        ctl.decided = None;
        format!("controller {c} {}", if ctl.up { "starts" } else { "dies" })
    }

    /// One whole pass (convergence): decide and write at once.
    pub fn controller_pass(&mut self) -> Vec<String> {
        let gone = self.removable();
        for n in &gone {
            self.remove_node(n);
        }
        gone
    }

    /// One transaction: the fence, and every lease of the node, on the
    /// node's liveness being absent (as `Store::remove_node`: a node that
    /// registered since the decision, powered on again, is not removed).
    fn remove_node(&mut self, n: &str) {
        if self.store.liveness.contains_key(n) {
            return;
        }
        self.store.fences.insert(n.to_string());
        self.store.blocks.retain(|_, l| l.node != n);
    }

    /// The real removal rule on the store's view of the nodes and the
    /// Kubernetes Node set.
    fn removable(&self) -> Vec<String> {
        let mut names: BTreeSet<String> = self.store.liveness.keys().cloned().collect();
        names.extend(self.store.blocks.values().map(|l| l.node.clone()));
        let nodes: Vec<NodeStatus> = names
            .iter()
            .map(|n| {
                let mut s = NodeStatus::gone(n);
                s.alive = self.store.liveness.contains_key(n);
                s.blocks = self.store.blocks.values().filter(|l| &l.node == n).count();
                if self.store.fences.contains(n) {
                    s.removed = Some(coil::store::RemovalRecord {
                        node: n.clone(),
                        removed_unix: self.now,
                        reason: "sim".into(),
                        blocks: Vec::new(),
                    });
                }
                s
            })
            .collect();
        // The guard's fraction is 1.0: a cluster of four may lose its
        // only block holder, which the default (0.5) would hold back.
        if coil::removal::judge_node_list(&nodes, &self.kube, 1.0).is_err() {
            return Vec::new();
        }
        coil::removal::removable_nodes(&nodes, Some(&self.kube))
    }

    /// The node's journal is destroyed; the operator runs `coilctl node
    /// repair --rebuild` (coild stopped): a new journal from the store's
    /// leases of the node and the kernel's veths, as coil-recovery's
    /// rebuild does. Needs the store.
    pub fn rebuild_journal(&mut self, i: usize) -> bool {
        if self.nodes[i].partitioned {
            return false;
        }
        if self.nodes[i].machine.is_some() {
            self.kill(i, 0);
        }
        let name = self.nodes[i].name.clone();
        let boot = format!("boot{}", self.nodes[i].boot);
        // A pod whose veth was deleted by hand before the journal was lost
        // leaves nothing to rebuild it from: it is the runtime's to
        // recreate (its CHECK fails), not coil's to remember.
        let kernel = &self.nodes[i].kernel;
        for p in self.pods.values_mut() {
            if p.node == i && p.drifted && !kernel.contains_key(&World::veth_of(&p.key)) {
                p.dead = true;
            }
        }
        let mut d = Durable::default();
        for (b, l) in &self.store.blocks {
            if l.node == name {
                d.leases.insert(
                    *b,
                    BlockLease {
                        pool: l.pool.clone(),
                        block: *b,
                        epoch: l.epoch,
                        state: LeaseState::Leased,
                        alloc_cursor: 0,
                    },
                );
            }
        }
        for (veth, v) in &self.nodes[i].kernel {
            let a = coil::journal::Attachment {
                key: v.key.clone(),
                netns: v.netns.clone(),
                pod_namespace: String::new(),
                pod_name: String::new(),
                pool: POOL.into(),
                addresses: v
                    .addrs
                    .iter()
                    .filter_map(|x| {
                        let block = d.leases.keys().find(|b| b.contains(x))?;
                        Some(coil::journal::AssignedAddress {
                            addr: *x,
                            block: *block,
                        })
                    })
                    .collect(),
                host_veth: veth.clone(),
                state: coil::journal::AttachmentState::Wired,
                boot_id: boot.clone(),
                created_unix: 0,
            };
            // As coil-recovery's rebuild: a veth with no address in a
            // block this node leases is no attachment (a kill's fresh
            // links, say); the machine's scan removes it.
            if a.addresses.is_empty() {
                continue;
            }
            for x in &a.addresses {
                d.addresses.insert(
                    x.addr,
                    coil::journal::AddressEntry {
                        attachment: a.key.clone(),
                        block: x.block,
                    },
                );
            }
            d.attachments.insert(a.key.clone(), a);
        }
        self.nodes[i].durable = d;
        self.nodes[i].unsynced.clear();
        true
    }

    // ---- the container runtime ----

    /// Creates a pod on node `i` and sends its ADD; one pod in five is on
    /// a second network (a second CNI network of the same runtime).
    pub fn add_pod(&mut self, i: usize, second: bool) {
        let network = if second { NETWORKS[1] } else { NETWORKS[0] };
        let key = AttachmentKey::new(network, format!("c{}", self.next_pod), "eth0");
        let netns = format!("/run/netns/p{}", self.next_pod);
        self.next_pod += 1;
        self.nodes[i].netns.insert(netns.clone());
        self.pods.insert(
            key.clone(),
            Pod {
                node: i,
                key: key.clone(),
                netns: netns.clone(),
                state: PodState::Adding,
                boot: self.nodes[i].boot,
                dead: false,
                drifted: false,
                add_failed: false,
            },
        );
        let r = Request::Add {
            key: key.clone(),
            netns,
            pool: POOL.into(),
            families: self.families.clone(),
            pod: Default::default(),
        };
        self.request(i, key, Kind::Add, r);
    }

    /// The runtime sends a failed ADD of node `i` again, same container
    /// id, same netns (a retry instead of a teardown). False when no pod
    /// there qualifies.
    pub fn retry_add(&mut self, i: usize, pick: usize) -> Option<AttachmentKey> {
        let n = &self.nodes[i];
        let busy: BTreeSet<&AttachmentKey> = n.requests.values().map(|(k, _)| k).collect();
        let keys: Vec<AttachmentKey> = self
            .pods
            .values()
            .filter(|p| {
                p.node == i
                    && p.add_failed
                    && !p.dead
                    && p.boot == n.boot
                    && n.netns.contains(&p.netns)
                    && !busy.contains(&p.key)
            })
            .map(|p| p.key.clone())
            .collect();
        let key = keys.get(pick % keys.len().max(1))?.clone();
        let p = self.pods.get_mut(&key)?;
        p.add_failed = false;
        p.state = PodState::Adding;
        let r = Request::Add {
            key: key.clone(),
            netns: p.netns.clone(),
            pool: POOL.into(),
            families: self.families.clone(),
            pod: Default::default(),
        };
        self.request(i, key.clone(), Kind::Add, r);
        Some(key)
    }

    /// Sends a DEL for a pod (its netns removed first when `no_netns`).
    pub fn del_pod(&mut self, key: &AttachmentKey, no_netns: bool) {
        let Some(p) = self.pods.get_mut(key) else {
            return;
        };
        p.state = PodState::Deleting;
        p.add_failed = false;
        let (i, netns) = (p.node, p.netns.clone());
        if no_netns {
            self.delete_netns(i, &netns);
        }
        self.request(i, key.clone(), Kind::Del, Request::Del { key: key.clone() });
    }

    pub fn check_pod(&mut self, key: &AttachmentKey) {
        let Some(p) = self.pods.get(key) else {
            return;
        };
        let i = p.node;
        self.request(
            i,
            key.clone(),
            Kind::Check,
            Request::Check { key: key.clone() },
        );
    }

    /// CNI GC of one network on node `i`: keep every pod the runtime
    /// still has there on that network.
    pub fn gc(&mut self, i: usize, network: &str) {
        let keep: BTreeSet<AttachmentKey> = self
            .pods
            .values()
            .filter(|p| p.node == i && p.key.network == network)
            .map(|p| p.key.clone())
            .collect();
        let key = AttachmentKey::new("gc", "gc", "gc");
        let network = network.to_string();
        self.request(i, key, Kind::Gc, Request::Gc { network, keep });
    }

    fn runtime_answer(&mut self, i: usize, key: &AttachmentKey, kind: Kind, a: Answer) {
        match (kind, a) {
            (Kind::Add, Answer::Added(addrs)) => {
                if let Some(p) = self.pods.get_mut(key) {
                    if p.state == PodState::Adding && p.node == i {
                        p.state = PodState::Running(addrs);
                    }
                }
            }
            (Kind::Del, Answer::Deleted) => {
                if let Some(p) = self.pods.remove(key) {
                    self.delete_netns(p.node, &p.netns);
                }
            }
            (kind, Answer::Failed(..)) => self.runtime_failed(key, kind),
            _ => {}
        }
    }

    /// A request failed: a failed ADD leaves the pod to be deleted (the
    /// runtime sends DEL next), a failed DEL is retried later.
    fn runtime_failed(&mut self, key: &AttachmentKey, kind: Kind) {
        if let Some(p) = self.pods.get_mut(key) {
            match kind {
                Kind::Add if p.state == PodState::Adding => {
                    p.state = PodState::Deleting;
                    p.add_failed = true;
                }
                Kind::Del => p.state = PodState::Deleting,
                _ => {}
            }
        }
    }

    /// A pod netns is deleted: the veths whose pod end was in it go with
    /// it, as the kernel does.
    pub fn delete_netns(&mut self, i: usize, ns: &str) {
        let n = &mut self.nodes[i];
        n.netns.remove(ns);
        n.kernel.retain(|_, v| v.netns != ns);
        for p in self.pods.values_mut() {
            if p.node == i && p.netns == ns {
                p.dead = true;
            }
        }
    }

    /// A running pod's veth is deleted by hand; its netns lives on.
    pub fn delete_veth(&mut self, key: &AttachmentKey) -> bool {
        let Some(p) = self.pods.get_mut(key) else {
            return false;
        };
        if p.dead || !matches!(p.state, PodState::Running(_)) {
            return false;
        }
        p.drifted = true;
        self.nodes[p.node]
            .kernel
            .remove(&World::veth_of(key))
            .is_some()
    }

    /// Node `i` running and a member?
    pub fn up(&self, i: usize) -> bool {
        self.nodes[i].machine.is_some()
    }

    /// The host veth a pod was given.
    pub fn veth_of(key: &AttachmentKey) -> String {
        host_veth_name(key)
    }
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}
