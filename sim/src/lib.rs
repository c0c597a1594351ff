//! coil-sim: a deterministic, seeded simulation of a coil cluster.
//!
//! Several nodes run the real node machine ([`coil::machine`]) with a
//! journal model (durable batches, and unsynced ones a crash may lose as
//! a suffix), a kernel model and a container runtime that sends ADD, DEL
//! (also twice, or without a netns), CHECK and GC. A linearizable store
//! model holds block leases, liveness that expires in simulated time and
//! removal fences; the controller applies the real removal rule
//! ([`coil::removal`]). Faults come at every step: coild killed between
//! any two effects (a crash-restart), reboots, partitions of single nodes
//! from the store, store writes that were applied but answered as
//! unavailable, failed and timed-out wires, netns deleted under a pod,
//! nodes decommissioned and new ones joining.
//!
//! Every step draws from a generator of its own (seed, step index), so a
//! failing seed replays exactly and a failing schedule can be shrunk by
//! leaving steps out ([`reduce`]). The invariants (BRIEF section 7,
//! cluster-wide) are checked after every step ([`check`]).

pub mod world;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use coil::journal::LeaseState;
use coil::store::model::Family;
pub use world::World;
use world::{Kind, PodState};

/// Pods the runtime keeps per node at most.
const MAX_PODS: usize = 6;

/// The generator of step `i` of seed `seed`.
pub fn step_rng(seed: u64, i: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// How a run ended.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub seed: u64,
    pub steps: u64,
    pub crashes: u64,
    pub adds_ok: u64,
    /// The first invariant that broke: (step, what).
    pub violation: Option<(u64, String)>,
    /// The last steps before the violation (when traced).
    pub trace: Vec<String>,
}

/// Runs `steps` steps of `seed` (only those in `only`, when given), then
/// the convergence phase; stops at the first violation.
pub fn run(seed: u64, steps: u64, only: Option<&BTreeSet<u64>>, trace: bool) -> Report {
    let mut w = World::new();
    let mut rep = Report {
        seed,
        ..Report::default()
    };
    for i in 0..steps {
        if only.is_some_and(|o| !o.contains(&i)) {
            continue;
        }
        let mut rng = step_rng(seed, i);
        let what = step(&mut w, &mut rng);
        rep.steps += 1;
        if trace {
            w.trace.push(format!("step {i}: {what}"));
        }
        if let Err(v) = check(&w) {
            rep.violation = Some((i, v));
            break;
        }
    }
    if rep.violation.is_none() {
        if let Err(v) = converge(&mut w) {
            rep.violation = Some((steps, format!("[converge] {v}")));
        }
    }
    rep.crashes = w.crashes;
    rep.adds_ok = w.adds_ok();
    if trace {
        let n = w.trace.len();
        rep.trace = w.trace.split_off(n.saturating_sub(60));
    }
    rep
}

fn pick<T: Clone>(rng: &mut StdRng, v: &[T]) -> Option<T> {
    if v.is_empty() {
        None
    } else {
        Some(v[rng.gen_range(0..v.len())].clone())
    }
}

/// One step of the schedule: a caller's request, an effect run or
/// delivered, a tick, time passing, or a fault. Returns what it did.
pub fn step(w: &mut World, rng: &mut StdRng) -> String {
    let members: Vec<usize> = (0..w.nodes.len()).filter(|i| w.member(*i)).collect();
    let up: Vec<usize> = members.iter().copied().filter(|i| w.up(*i)).collect();
    let roll = rng.gen_range(0..1000);
    match roll {
        // Effects: run one, or deliver one that ran.
        0..=339 => {
            let with: Vec<usize> = up
                .iter()
                .copied()
                .filter(|i| !w.nodes[*i].effects.is_empty())
                .collect();
            let Some(i) = pick(rng, &with) else {
                return "no effect pending".into();
            };
            let k = rng.gen_range(0..w.nodes[i].effects.len());
            let desc = format!("{:?}", w.nodes[i].effects[k].effect);
            if w.nodes[i].effects[k].outcome.is_none() {
                w.run_effect(i, k, rng);
                if rng.gen_bool(0.7) {
                    w.deliver(i, k);
                    return format!("{}: run and deliver {desc}", w.nodes[i].name);
                }
                return format!("{}: run {desc}", w.nodes[i].name);
            }
            w.deliver(i, k);
            format!("{}: deliver {desc}", w.nodes[i].name)
        }
        // The runtime.
        340..=489 => {
            let Some(i) = pick(rng, &up) else {
                return "no node up".into();
            };
            if rng.gen_bool(0.15) {
                if let Some(k) = w.retry_add(i, rng.gen_range(0..1000)) {
                    return format!(
                        "{}: ADD {} again (a retry)",
                        w.nodes[i].name, k.container_id
                    );
                }
            }
            let here = w.pods.values().filter(|p| p.node == i).count();
            if here >= MAX_PODS {
                return "pod limit".into();
            }
            let second = rng.gen_bool(0.2);
            w.add_pod(i, second);
            format!(
                "{}: ADD c{}{}",
                w.nodes[i].name,
                w.next_pod - 1,
                if second { " (second network)" } else { "" }
            )
        }
        490..=599 => {
            let keys: Vec<_> = w
                .pods
                .values()
                .filter(|p| !matches!(p.state, PodState::Adding) || rng.gen_bool(0.1))
                .map(|p| p.key.clone())
                .collect();
            let Some(k) = pick(rng, &keys) else {
                return "no pod to delete".into();
            };
            let no_netns = rng.gen_bool(0.1);
            w.del_pod(&k, no_netns);
            if rng.gen_bool(0.1) {
                w.del_pod(&k, false);
                return format!("DEL {} twice", k.container_id);
            }
            format!(
                "DEL {}{}",
                k.container_id,
                if no_netns { " (netns gone)" } else { "" }
            )
        }
        600..=619 => {
            let keys: Vec<_> = w.pods.keys().cloned().collect();
            let Some(k) = pick(rng, &keys) else {
                return "no pod to check".into();
            };
            w.check_pod(&k);
            format!("CHECK {}", k.container_id)
        }
        620..=634 => {
            let Some(i) = pick(rng, &up) else {
                return "no node up".into();
            };
            let net = world::NETWORKS[rng.gen_range(0..2)];
            w.gc(i, net);
            format!("{}: GC of {net}", w.nodes[i].name)
        }
        // A running pod's veth deleted by hand: coild must rebuild it.
        635..=637
            if w.pods
                .values()
                .any(|p| !p.dead && matches!(p.state, PodState::Running(_))) =>
        {
            let keys: Vec<_> = w
                .pods
                .values()
                .filter(|p| !p.dead && matches!(p.state, PodState::Running(_)))
                .map(|p| p.key.clone())
                .collect();
            let Some(k) = pick(rng, &keys) else {
                return "no running pod".into();
            };
            let n = w.pods[&k].node;
            if !w.delete_veth(&k) {
                return format!("{}: the veth of {} was already gone", w.nodes[n].name, k);
            }
            format!("{}: the veth of {} deleted by hand", w.nodes[n].name, k)
        }
        // A pod's netns deleted behind coil's back (the runtime will DEL).
        635..=644 => {
            let keys: Vec<_> = w.pods.values().map(|p| (p.node, p.netns.clone())).collect();
            let Some((i, ns)) = pick(rng, &keys) else {
                return "no netns".into();
            };
            w.delete_netns(i, &ns);
            format!("{}: netns {ns} deleted", w.nodes[i].name)
        }
        645..=719 => {
            let Some(i) = pick(rng, &up) else {
                return "no node up".into();
            };
            w.tick(i);
            format!("{}: tick", w.nodes[i].name)
        }
        720..=759 => {
            let s = rng.gen_range(1..=20);
            w.advance(s);
            format!("{s} s pass")
        }
        760..=789 => {
            let c = rng.gen_range(0..2);
            match rng.gen_range(0..10) {
                0..=4 => w.controller_decide(c),
                5..=8 => w.controller_write(c),
                _ => w.controller_toggle(c),
            }
        }
        // Crash-restart: coild killed at this point, started again.
        790..=899 => {
            let Some(i) = pick(rng, &up) else {
                return "no node up".into();
            };
            let keep = rng.gen_range(0..=w.nodes[i].unsynced.len());
            let leave = rng.gen_bool(0.5);
            w.kill_leaving(i, keep, leave);
            w.start(i);
            format!(
                "{}: kill -9 (kept {keep} unsynced{}), restart",
                w.nodes[i].name,
                if leave { ", fresh links left" } else { "" }
            )
        }
        900..=914 => {
            let Some(i) = pick(rng, &up) else {
                return "no node up".into();
            };
            let keep = rng.gen_range(0..=w.nodes[i].unsynced.len());
            w.kill(i, keep);
            format!("{}: kill -9, stays down", w.nodes[i].name)
        }
        915..=939 => {
            let down: Vec<usize> = members.iter().copied().filter(|i| !w.up(*i)).collect();
            let Some(i) = pick(rng, &down) else {
                return "no node down".into();
            };
            w.start(i);
            format!("{}: coild started", w.nodes[i].name)
        }
        940..=944 => {
            let Some(i) = pick(rng, &members) else {
                return "no member".into();
            };
            if !w.rebuild_journal(i) {
                return format!("{}: journal lost, rebuild needs the store", w.nodes[i].name);
            }
            w.start(i);
            format!(
                "{}: journal destroyed, node repair --rebuild, restart",
                w.nodes[i].name
            )
        }
        945..=954 => {
            let Some(i) = pick(rng, &members) else {
                return "no member".into();
            };
            let keep = rng.gen_range(0..=w.nodes[i].unsynced.len());
            w.reboot(i, keep);
            format!(
                "{}: reboot (power cut, kept {keep} unsynced)",
                w.nodes[i].name
            )
        }
        955..=989 => {
            let Some(i) = pick(rng, &members) else {
                return "no member".into();
            };
            let n = &mut w.nodes[i];
            n.partitioned = !n.partitioned;
            format!(
                "{}: {}",
                n.name,
                if n.partitioned {
                    "cut off from the store"
                } else {
                    "reconnected"
                }
            )
        }
        990..=994 if (0..w.nodes.len()).any(|i| !w.member(i) && !w.up(i)) => {
            let gone: Vec<usize> = (0..w.nodes.len())
                .filter(|i| !w.member(*i) && !w.up(*i))
                .collect();
            let Some(i) = pick(rng, &gone) else {
                return "no node to come back".into();
            };
            let cut = rng.gen_bool(0.5);
            w.come_back(i, cut);
            format!(
                "{}: powered on again after its Node was deleted{}",
                w.nodes[i].name,
                if cut { ", cut off from the store" } else { "" }
            )
        }
        _ => {
            if members.len() <= 2 {
                return "too few members to decommission".into();
            }
            let Some(i) = pick(rng, &members) else {
                return "no member".into();
            };
            w.decommission(i);
            let j = w.join();
            format!(
                "{}: decommissioned (Node deleted); {} joins",
                w.nodes[i].name, w.nodes[j].name
            )
        }
    }
}

/// The cluster-wide invariants, after every step.
pub fn check(w: &World) -> Result<(), String> {
    // 1. No address on two live interfaces, cluster-wide.
    let mut seen: BTreeMap<IpAddr, (String, String)> = BTreeMap::new();
    for (i, n) in w.nodes.iter().enumerate() {
        if !w.member(i) {
            continue;
        }
        for (veth, v) in &n.kernel {
            for a in &v.addrs {
                if let Some((on, other)) = seen.insert(*a, (n.name.clone(), veth.clone())) {
                    return Err(format!(
                        "[duplicate] address {a} is on {veth} of {} and on {other} of {on}",
                        n.name
                    ));
                }
            }
        }
    }
    // 2. Every address on a member's interface is in a block the store
    //    says that node leases.
    for (i, n) in w.nodes.iter().enumerate() {
        if !w.member(i) {
            continue;
        }
        for (veth, v) in &n.kernel {
            for a in &v.addrs {
                let owner = w
                    .store
                    .blocks
                    .iter()
                    .find(|(b, _)| b.contains(a))
                    .map(|(_, l)| l.node.clone());
                if owner.as_deref() != Some(n.name.as_str()) {
                    return Err(format!(
                        "[ownership] address {a} on {veth} of {} is in a block the store gives to {}",
                        n.name,
                        owner.unwrap_or_else(|| "nobody".into())
                    ));
                }
            }
        }
    }
    // 3. Table 119 publishes only blocks the store gives the node.
    for (i, n) in w.nodes.iter().enumerate() {
        if !w.member(i) {
            continue;
        }
        for b in &n.table {
            let owner = w.store.blocks.get(b).map(|l| l.node.as_str());
            if owner != Some(n.name.as_str()) {
                return Err(format!(
                    "[table] {} publishes {b} in table 119, which the store gives to {}",
                    n.name,
                    owner.unwrap_or("nobody")
                ));
            }
        }
    }
    // 4. Every ADD that succeeded is still wired, with its addresses,
    //    until its DEL.
    for p in w.pods.values() {
        let PodState::Running(addrs) = &p.state else {
            continue;
        };
        let n = &w.nodes[p.node];
        if p.boot != n.boot || !w.member(p.node) || p.dead {
            continue;
        }
        let veth = World::veth_of(&p.key);
        match n.kernel.get(&veth) {
            Some(v) if same(&v.addrs, addrs) => {}
            // Deleted by hand: rebuilt by a later tick (checked when the
            // run settles, see `converge`).
            None if p.drifted => {}
            Some(v) => {
                return Err(format!(
                    "[lost ADD] pod {} was given {addrs:?} but its veth {veth} on {} has {:?}",
                    p.key, n.name, v.addrs
                ))
            }
            None => {
                return Err(format!(
                    "[lost ADD] pod {} was given {addrs:?} but its veth {veth} on {} is gone",
                    p.key, n.name
                ))
            }
        }
    }
    // 5. The runtime's successful ADDs hold one address of each family.
    for p in w.pods.values() {
        if let PodState::Running(addrs) = &p.state {
            for f in &w.families {
                if addrs.iter().filter(|a| Family::of_addr(a) == *f).count() != 1 {
                    return Err(format!("[families] pod {} was given {addrs:?}", p.key));
                }
            }
        }
    }
    Ok(())
}

fn same(a: &[IpAddr], b: &[IpAddr]) -> bool {
    let x: BTreeSet<_> = a.iter().collect();
    let y: BTreeSet<_> = b.iter().collect();
    x == y
}

/// The end of a run: partitions heal, every member's coild runs, every
/// pod is deleted, and the cluster must settle with nothing leaked.
/// Ticks every member node once and runs its effects, reliably, until
/// none is left (bounded).
fn tick_members_to_rest(w: &mut World) {
    for i in 0..w.nodes.len() {
        if !w.member(i) {
            continue;
        }
        w.tick(i);
        let mut guard = 0;
        while !w.nodes[i].effects.is_empty() && guard < 1000 {
            guard += 1;
            if w.nodes[i].effects[0].outcome.is_none() {
                let mut rng = StdRng::seed_from_u64(guard);
                w.run_effect_reliably(i, 0, &mut rng);
            }
            w.deliver(i, 0);
        }
    }
}

pub fn converge(w: &mut World) -> Result<(), String> {
    for i in 0..w.nodes.len() {
        if w.member(i) {
            w.nodes[i].partitioned = false;
            if !w.up(i) {
                w.start(i);
            }
        }
    }
    // First, with nothing deleted, let every node tick until its effects
    // are done: a veth deleted by hand under a running pod must be back.
    for _ in 0..3 {
        tick_members_to_rest(w);
        w.advance(10);
    }
    for p in w.pods.values() {
        let PodState::Running(addrs) = &p.state else {
            continue;
        };
        let n = &w.nodes[p.node];
        if !p.drifted || p.dead || p.boot != n.boot || !w.member(p.node) {
            continue;
        }
        let back = n
            .kernel
            .get(&World::veth_of(&p.key))
            .is_some_and(|v| same(&v.addrs, addrs));
        if !back {
            return Err(format!(
                "[drift] the veth of running pod {} on {}, deleted by hand, was never rebuilt",
                p.key, n.name
            ));
        }
    }
    for _ in 0..200 {
        let keys: Vec<_> = w
            .pods
            .values()
            .filter(|p| {
                !w.nodes[p.node]
                    .requests
                    .values()
                    .any(|(k, kind)| k == &p.key && *kind == Kind::Del)
            })
            .map(|p| p.key.clone())
            .collect();
        for k in keys {
            w.del_pod(&k, false);
        }
        tick_members_to_rest(w);
        w.advance(10);
        w.controller_pass();
        if w.settled() {
            break;
        }
    }
    check(w)?;
    if !w.pods.is_empty() {
        return Err(format!("{} pods were never deleted", w.pods.len()));
    }
    for (i, n) in w.nodes.iter().enumerate() {
        if !w.member(i) {
            if let Some((b, _)) = w.store.blocks.iter().find(|(_, l)| l.node == n.name) {
                return Err(format!(
                    "{} was decommissioned but still leases {b} in the store",
                    n.name
                ));
            }
            continue;
        }
        if let Some(v) = n.kernel.keys().next() {
            return Err(format!("{} still has veth {v} after every DEL", n.name));
        }
        if let Some(k) = n.durable.attachments.keys().next() {
            return Err(format!("{}'s journal still holds attachment {k}", n.name));
        }
        if let Some(a) = n.durable.addresses.keys().next() {
            return Err(format!("{}'s journal still holds address {a}", n.name));
        }
        if let Some(i) = n.durable.intents.values().next() {
            return Err(format!("{}'s journal still holds intent {i:?}", n.name));
        }
        let leased: BTreeSet<IpNet> = w
            .store
            .blocks
            .iter()
            .filter(|(_, l)| l.node == n.name)
            .map(|(b, _)| *b)
            .collect();
        if n.table != leased {
            return Err(format!(
                "{}'s table 119 holds {:?} but it leases {:?}",
                n.name, n.table, leased
            ));
        }
        let mut per: BTreeMap<Family, usize> = BTreeMap::new();
        for (b, l) in &w.store.blocks {
            if l.node == n.name {
                *per.entry(Family::of(b)).or_default() += 1;
                let j = n.durable.leases.get(b);
                if j.is_none_or(|j| j.state != LeaseState::Leased || j.epoch != l.epoch) {
                    return Err(format!(
                        "{} leases {b} in the store but its journal has {j:?}",
                        n.name
                    ));
                }
            }
        }
        if let Some((f, c)) = per.iter().find(|(_, c)| **c > w.min_blocks) {
            return Err(format!(
                "{} holds {c} idle {f} blocks, more than the minimum {}",
                n.name, w.min_blocks
            ));
        }
    }
    Ok(())
}

/// Shrinks a failing schedule: leaves out chunks of steps while the run
/// still breaks the same invariant (the `[kind]` its message starts
/// with), for at most `budget`. Returns the steps kept.
pub fn reduce(seed: u64, failed_at: u64, budget: Duration) -> BTreeSet<u64> {
    let t0 = Instant::now();
    let mut kept: Vec<u64> = (0..=failed_at).collect();
    let mut chunk = kept.len().div_ceil(2).max(1);
    let kind_of = |v: &str| v.split(']').next().unwrap_or_default().to_string();
    let want = run(seed, failed_at + 1, None, false)
        .violation
        .map(|(_, v)| kind_of(&v));
    let fails = |k: &[u64]| {
        let only: BTreeSet<u64> = k.iter().copied().collect();
        let got = run(seed, failed_at + 1, Some(&only), false).violation;
        got.is_some() && got.map(|(_, v)| kind_of(&v)) == want
    };
    while t0.elapsed() < budget {
        let mut removed_any = false;
        let mut start = 0;
        while start < kept.len() && t0.elapsed() < budget {
            let end = (start + chunk).min(kept.len());
            let mut trial = kept.clone();
            trial.drain(start..end);
            if !trial.is_empty() && fails(&trial) {
                kept = trial;
                removed_any = true;
            } else {
                start = end;
            }
        }
        if chunk == 1 && !removed_any {
            break;
        }
        if !removed_any {
            chunk = (chunk / 2).max(1);
        }
    }
    kept.into_iter().collect()
}

impl World {
    /// Pods whose ADD succeeded so far (still running).
    pub fn adds_ok(&self) -> u64 {
        self.pods
            .values()
            .filter(|p| matches!(p.state, PodState::Running(_)))
            .count() as u64
    }

    /// Runs an effect with no injected failure (convergence).
    pub fn run_effect_reliably(&mut self, i: usize, k: usize, rng: &mut StdRng) {
        // Retry the draw until it is not a refused or timed-out wire:
        // the effects are idempotent, so a re-run is what a retry does.
        for _ in 0..50 {
            self.run_effect(i, k, rng);
            match &self.nodes[i].effects[k].outcome {
                Some(coil::machine::Outcome::WireFailed(_, why)) if why.contains("refused") => {}
                Some(coil::machine::Outcome::WireTimedOut) => {}
                // An acquisition is not re-run: an ambiguous answer may
                // hide a lease it took, which the machine adopts from a
                // view; a second run would take another block.
                Some(coil::machine::Outcome::Unavailable)
                    if !matches!(
                        self.nodes[i].effects[k].effect,
                        coil::machine::Effect::Acquire { .. }
                    ) => {}
                _ => return,
            }
        }
    }

    /// Nothing left to do: no pod, no effect, no request in flight.
    pub fn settled(&self) -> bool {
        let members: BTreeSet<&String> = self.kube.iter().collect();
        let mut held: BTreeMap<(&String, Family), usize> = BTreeMap::new();
        for (b, l) in &self.store.blocks {
            *held.entry((&l.node, Family::of(b))).or_default() += 1;
        }
        self.pods.is_empty()
            && self
                .store
                .blocks
                .values()
                .all(|l| members.contains(&l.node))
            && held.values().all(|c| *c <= self.min_blocks)
            && self
                .nodes
                .iter()
                .enumerate()
                .filter(|(i, _)| self.member(*i))
                .all(|(_, n)| {
                    n.effects.is_empty()
                        && n.kernel.is_empty()
                        && n.durable.attachments.is_empty()
                        && n.durable.intents.is_empty()
                })
    }
}
