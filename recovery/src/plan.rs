//! The pure half of recovery: what was observed, what differs, and the
//! ordered plan that brings journal, store and kernel back into agreement.
//! No I/O; table-tested without root.
//!
//! Rules (each backed by a test below):
//! - a changed boot id means every attachment of the previous boot is gone
//!   with its kernel state: all are released at once;
//! - a pending intent is rolled forward when the pod's netns still exists,
//!   back otherwise;
//! - restoration comes first (adopt, re-acquire, quarantine, re-wire,
//!   export), releases last, so nothing is released before what may still
//!   need it is restored;
//! - a record that is the only copy of a fact is never deleted: a store
//!   lease nothing uses is released only when the store is the sole holder
//!   and no attachment, kernel route or pending acquisition refers to it;
//! - only coil's own kernel objects are touched: links named `coil…` whose
//!   alias starts with `coil:`, and routes carrying coil's protocol id.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use coil::journal::{
    Attachment, AttachmentKey, AttachmentState, BlockLease, Intent, IntentOp, IntentState,
    LeaseState,
};
use ipnet::IpNet;
use serde::Serialize;

/// A lease as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreLease {
    pub pool: String,
    pub block: IpNet,
    pub node: String,
    pub epoch: i64,
    pub acquired_unix: u64,
}

/// One host-side link that looks like coil's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostLink {
    pub name: String,
    pub alias: Option<String>,
}

impl HostLink {
    /// Ours: our name prefix and our alias prefix, both.
    pub fn is_ours(&self) -> bool {
        self.name.starts_with("coil")
            && self
                .alias
                .as_deref()
                .is_some_and(|a| a.starts_with("coil:"))
    }
}

/// What the kernel shows (coild's netns).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KernelView {
    pub links: Vec<HostLink>,
    /// Host routes with coil's protocol id (main table): destination and
    /// output link name.
    pub host_routes: Vec<(IpNet, String)>,
    /// Blocks published in coil's table with coil's protocol id.
    pub exported: Vec<IpNet>,
}

/// Everything recovery looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation {
    pub node: String,
    /// The kernel's boot id now.
    pub boot_id: String,
    /// The boot id the journal recorded (None for a fresh journal).
    pub journal_boot_id: Option<String>,
    pub leases: Vec<BlockLease>,
    pub attachments: Vec<Attachment>,
    pub intents: Vec<Intent>,
    /// The store's leases for this node's blocks and every lease it holds
    /// for this node; None when the store is unreachable.
    pub store: Option<Vec<StoreLease>>,
    pub kernel: KernelView,
    /// Network namespace paths (of attachments) that exist now.
    pub live_netns: BTreeSet<String>,
    /// The node carries a removal fence in the store (`coilctl node
    /// remove`, or its Kubernetes Node deleted): its blocks were freed and
    /// may be another node's now. False when the store is unreachable.
    pub removed: bool,
    /// The node booted and the store has not confirmed its leases yet:
    /// publish none of them (a node removed while powered off would
    /// advertise blocks that are other nodes' now), unless this very
    /// observation reached the store.
    pub hold_exports: bool,
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Record a lease the store holds for us but the journal lacks.
    AdoptLease { lease: StoreLease },
    /// The store lost our lease and the block is free: take it again.
    ReacquireLease { pool: String, block: IpNet },
    /// Another node holds a block we recorded: stop using it and report.
    QuarantineLease {
        block: IpNet,
        owner: String,
        affected: Vec<String>,
    },
    /// Rebuild an attachment's kernel state (its netns exists).
    Rewire {
        #[serde(serialize_with = "ser_key")]
        key: AttachmentKey,
    },
    /// Publish a leased block in table 119.
    ExportBlock { block: IpNet },
    /// Remove a block route we no longer lease.
    WithdrawBlock { block: IpNet },
    /// Release an attachment: kernel state, then its records.
    ReleaseAttachment {
        #[serde(serialize_with = "ser_key")]
        key: AttachmentKey,
        reason: String,
    },
    /// Delete a coil link no attachment owns.
    RemoveLink { name: String },
    /// Delete a coil host route no attachment owns.
    RemoveHostRoute { dst: IpNet, dev: String },
    /// Release a store lease nothing on this node uses.
    ReleaseStoreLease { lease: StoreLease },
    /// Delete the journal's record of a lease that is released.
    ForgetLease { block: IpNet },
    /// Forget a settled intent.
    DropIntent { id: u64, reason: String },
}

fn ser_key<S: serde::Serializer>(k: &AttachmentKey, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&k.to_string())
}

impl Action {
    /// Restorations run before releases.
    fn phase(&self) -> u8 {
        match self {
            Action::AdoptLease { .. }
            | Action::ReacquireLease { .. }
            | Action::QuarantineLease { .. } => 0,
            Action::Rewire { .. } => 1,
            Action::ExportBlock { .. } => 2,
            Action::ReleaseAttachment { .. } => 3,
            Action::RemoveLink { .. } | Action::RemoveHostRoute { .. } => 4,
            Action::WithdrawBlock { .. } => 5,
            Action::ReleaseStoreLease { .. } => 6,
            Action::ForgetLease { .. } => 7,
            Action::DropIntent { .. } => 8,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::AdoptLease { lease } => write!(
                f,
                "adopt lease {} of pool {} (epoch {}) held in the store",
                lease.block, lease.pool, lease.epoch
            ),
            Action::ReacquireLease { pool, block } => {
                write!(
                    f,
                    "re-acquire block {block} of pool {pool} (the store lost it)"
                )
            }
            Action::QuarantineLease {
                block,
                owner,
                affected,
            } => write!(
                f,
                "quarantine block {block}: {owner} holds it now; affected: {}",
                if affected.is_empty() {
                    "none".to_string()
                } else {
                    affected.join(", ")
                }
            ),
            Action::Rewire { key } => write!(f, "re-wire attachment {key}"),
            Action::ExportBlock { block } => write!(f, "export block {block} to the routing table"),
            Action::WithdrawBlock { block } => write!(f, "withdraw block route {block}"),
            Action::ReleaseAttachment { key, reason } => {
                write!(f, "release attachment {key} ({reason})")
            }
            Action::RemoveLink { name } => write!(f, "remove orphan link {name}"),
            Action::RemoveHostRoute { dst, dev } => {
                write!(f, "remove orphan host route {dst} dev {dev}")
            }
            Action::ReleaseStoreLease { lease } => write!(
                f,
                "release unused store lease {} of pool {}",
                lease.block, lease.pool
            ),
            Action::ForgetLease { block } => write!(f, "forget released lease {block}"),
            Action::DropIntent { id, reason } => write!(f, "drop intent {id} ({reason})"),
        }
    }
}

fn host_net(a: IpAddr) -> IpNet {
    IpNet::from(a)
}

/// Computes the plan. Pure.
pub fn plan(o: &Observation) -> Vec<Action> {
    let mut out: Vec<Action> = Vec::new();
    let rebooted = o.journal_boot_id.as_ref().is_some_and(|b| b != &o.boot_id);
    let atts: BTreeMap<&AttachmentKey, &Attachment> =
        o.attachments.iter().map(|a| (&a.key, a)).collect();
    let pending: Vec<&Intent> = o
        .intents
        .iter()
        .filter(|i| i.state == IntentState::Pending)
        .collect();
    let links: BTreeMap<&str, &HostLink> = o
        .kernel
        .links
        .iter()
        .map(|l| (l.name.as_str(), l))
        .collect();
    let mut released: BTreeSet<AttachmentKey> = BTreeSet::new();

    // 1. A new boot: every attachment of the previous one is gone.
    if rebooted {
        for a in &o.attachments {
            release(&mut out, &mut released, &a.key, "its boot is over");
        }
    }

    // 2. Pending intents.
    let mut rewired: BTreeSet<AttachmentKey> = BTreeSet::new();
    for i in &pending {
        match &i.op {
            IntentOp::Wire { key } => {
                match atts.get(key) {
                    Some(a) if !rebooted && o.live_netns.contains(&a.netns) => {
                        rewired.insert(key.clone());
                        out.push(Action::Rewire { key: key.clone() });
                    }
                    Some(_) => release(
                        &mut out,
                        &mut released,
                        key,
                        "its ADD never finished and the netns is gone",
                    ),
                    None => {}
                }
                out.push(Action::DropIntent {
                    id: i.id,
                    reason: "wire settled".into(),
                });
            }
            IntentOp::Unwire { key } => {
                if atts.contains_key(key) {
                    release(&mut out, &mut released, key, "its DEL never finished");
                }
                out.push(Action::DropIntent {
                    id: i.id,
                    reason: "unwire settled".into(),
                });
            }
            IntentOp::AcquireBlock { pool, .. } => {
                // Settled by the lease comparison below when the store
                // answers; kept otherwise.
                if o.store.is_some() {
                    out.push(Action::DropIntent {
                        id: i.id,
                        reason: format!("acquisition for pool {pool} settled against the store"),
                    });
                }
            }
            IntentOp::ReleaseBlock { .. } => {
                // The lease's Releasing state carries the release (below).
                if o.store.is_some() {
                    out.push(Action::DropIntent {
                        id: i.id,
                        reason: "release settled".into(),
                    });
                }
            }
            IntentOp::ExportBlock { .. } | IntentOp::WithdrawBlock { .. } => {
                out.push(Action::DropIntent {
                    id: i.id,
                    reason: "routing table is resynced".into(),
                });
            }
        }
    }

    // 3. Attachments against the kernel.
    let routes: BTreeSet<(IpNet, &str)> = o
        .kernel
        .host_routes
        .iter()
        .map(|(d, dev)| (*d, dev.as_str()))
        .collect();
    if !rebooted {
        for a in &o.attachments {
            if released.contains(&a.key) || rewired.contains(&a.key) {
                continue;
            }
            let has_wire = pending
                .iter()
                .any(|i| matches!(&i.op, IntentOp::Wire { key } | IntentOp::Unwire { key } if key == &a.key));
            match a.state {
                AttachmentState::Releasing => {
                    release(&mut out, &mut released, &a.key, "its DEL never finished")
                }
                AttachmentState::Reserved if !has_wire => {
                    release(&mut out, &mut released, &a.key, "reserved but never wired")
                }
                AttachmentState::Reserved => {}
                AttachmentState::Wired => {
                    let link_ok = links.contains_key(a.host_veth.as_str());
                    let routes_ok = a
                        .addresses
                        .iter()
                        .all(|x| routes.contains(&(host_net(x.addr), a.host_veth.as_str())));
                    if !(link_ok && routes_ok) {
                        if o.live_netns.contains(&a.netns) {
                            out.push(Action::Rewire { key: a.key.clone() });
                        } else {
                            release(
                                &mut out,
                                &mut released,
                                &a.key,
                                "its kernel state and netns are gone",
                            );
                        }
                    }
                }
            }
        }
    }

    // 4. Leases against the store.
    let mut usable: BTreeSet<IpNet> = o
        .leases
        .iter()
        .filter(|l| l.state == LeaseState::Leased)
        .map(|l| l.block)
        .collect();
    if o.removed {
        // Removed from the cluster: every block it recorded was freed by
        // the removal. Never serve or re-take one: quarantine them all
        // (their pods are reported), and adopt nothing.
        for l in &o.leases {
            match l.state {
                LeaseState::Quarantined => {}
                LeaseState::Releasing => out.push(Action::ForgetLease { block: l.block }),
                _ => {
                    usable.remove(&l.block);
                    out.push(Action::QuarantineLease {
                        block: l.block,
                        owner: "(this node was removed: coilctl node remove)".into(),
                        affected: affected_by(o, l.block),
                    });
                }
            }
        }
    } else if let Some(store) = &o.store {
        let by_block: BTreeMap<IpNet, &StoreLease> = store.iter().map(|l| (l.block, l)).collect();
        for l in &o.leases {
            if l.state == LeaseState::Quarantined {
                match by_block.get(&l.block) {
                    // Ours again in the store (re-acquired after a
                    // re-admission, or an acquisition whose answer was
                    // lost): the quarantine is over.
                    Some(s) if s.node == o.node => {
                        usable.insert(l.block);
                        out.push(Action::AdoptLease {
                            lease: (*s).clone(),
                        });
                    }
                    // Someone else's or free, and no pod of ours uses it:
                    // nothing left to remember.
                    _ if affected_by(o, l.block).is_empty() => {
                        out.push(Action::ForgetLease { block: l.block });
                    }
                    _ => {}
                }
                continue;
            }
            if l.state == LeaseState::Releasing {
                // A release that was interrupted: finish it.
                if let Some(s) = by_block.get(&l.block).filter(|s| s.node == o.node) {
                    out.push(Action::ReleaseStoreLease {
                        lease: (*s).clone(),
                    });
                }
                out.push(Action::ForgetLease { block: l.block });
                continue;
            }
            match by_block.get(&l.block) {
                Some(s) if s.node == o.node => {}
                Some(s) => {
                    usable.remove(&l.block);
                    out.push(Action::QuarantineLease {
                        block: l.block,
                        owner: s.node.clone(),
                        affected: affected_by(o, l.block),
                    });
                }
                None => out.push(Action::ReacquireLease {
                    pool: l.pool.clone(),
                    block: l.block,
                }),
            }
        }
        let journal_blocks: BTreeSet<IpNet> = o.leases.iter().map(|l| l.block).collect();
        for s in store.iter().filter(|s| s.node == o.node) {
            if journal_blocks.contains(&s.block) {
                continue;
            }
            let used = o
                .attachments
                .iter()
                .any(|a| a.addresses.iter().any(|x| s.block.contains(&x.addr)))
                || o.kernel
                    .host_routes
                    .iter()
                    .any(|(d, _)| s.block.contains(&d.addr()));
            let was_acquiring = pending
                .iter()
                .any(|i| matches!(&i.op, IntentOp::AcquireBlock { pool, .. } if pool == &s.pool));
            if used || was_acquiring || rebooted {
                // An acquisition the journal never recorded (or one we may
                // still use): adopt; an idle block is released later by the
                // empty-block rule, not here.
                usable.insert(s.block);
                out.push(Action::AdoptLease { lease: s.clone() });
            } else {
                out.push(Action::ReleaseStoreLease { lease: s.clone() });
            }
        }
    }

    // 5. Table 119 equals the usable leases (none while they are
    // unconfirmed after a boot and the store did not answer).
    if o.hold_exports && o.store.is_none() {
        usable.clear();
    }
    let exported: BTreeSet<IpNet> = o.kernel.exported.iter().copied().collect();
    for b in usable.difference(&exported) {
        out.push(Action::ExportBlock { block: *b });
    }
    for b in exported.difference(&usable) {
        out.push(Action::WithdrawBlock { block: *b });
    }

    // 6. Kernel objects of ours that nothing owns.
    let kept: BTreeMap<&str, &Attachment> = o
        .attachments
        .iter()
        .filter(|a| !released.contains(&a.key))
        .map(|a| (a.host_veth.as_str(), a))
        .collect();
    for l in &o.kernel.links {
        if l.is_ours()
            && !kept.contains_key(l.name.as_str())
            && !released_owns(&o.attachments, &released, &l.name)
        {
            out.push(Action::RemoveLink {
                name: l.name.clone(),
            });
        }
    }
    // A coil host route through a kept attachment's veth that is not one
    // of its addresses (routes through removed links go with them).
    for (dst, dev) in &o.kernel.host_routes {
        if let Some(a) = kept.get(dev.as_str()) {
            if !a.addresses.iter().any(|x| host_net(x.addr) == *dst) {
                out.push(Action::RemoveHostRoute {
                    dst: *dst,
                    dev: dev.clone(),
                });
            }
        }
    }

    out.sort_by_key(Action::phase);
    out
}

/// The attachments holding an address of `block`.
fn affected_by(o: &Observation, block: IpNet) -> Vec<String> {
    o.attachments
        .iter()
        .filter(|a| a.addresses.iter().any(|x| x.block == block))
        .map(|a| a.key.to_string())
        .collect()
}

/// Adds a release (once per attachment).
fn release(
    out: &mut Vec<Action>,
    released: &mut BTreeSet<AttachmentKey>,
    key: &AttachmentKey,
    reason: &str,
) {
    if released.insert(key.clone()) {
        out.push(Action::ReleaseAttachment {
            key: key.clone(),
            reason: reason.to_string(),
        });
    }
}

/// Is `link` the veth of an attachment being released (its release removes
/// it)?
fn released_owns(atts: &[Attachment], released: &BTreeSet<AttachmentKey>, link: &str) -> bool {
    atts.iter()
        .any(|a| a.host_veth == link && released.contains(&a.key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use coil::journal::AssignedAddress;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    fn lease(block: &str) -> BlockLease {
        BlockLease {
            pool: "default".into(),
            block: net(block),
            epoch: 7,
            state: LeaseState::Leased,
            alloc_cursor: 0,
        }
    }

    fn att(cid: &str, addr: &str, block: &str, state: AttachmentState) -> Attachment {
        Attachment {
            key: AttachmentKey::new("k8s", cid, "eth0"),
            netns: format!("/run/netns/{cid}"),
            pod_namespace: String::new(),
            pod_name: String::new(),
            pool: "default".into(),
            addresses: vec![AssignedAddress {
                addr: addr.parse().expect("ip"),
                block: net(block),
            }],
            host_veth: format!("coil{cid}"),
            state,
            boot_id: "b1".into(),
            created_unix: 0,
        }
    }

    fn wired_kernel(a: &Attachment) -> (HostLink, (IpNet, String)) {
        (
            HostLink {
                name: a.host_veth.clone(),
                alias: Some(format!("coil:eth0:{}", a.key.container_id)),
            },
            (IpNet::from(a.addresses[0].addr), a.host_veth.clone()),
        )
    }

    fn store_lease(block: &str, node: &str) -> StoreLease {
        StoreLease {
            pool: "default".into(),
            block: net(block),
            node: node.into(),
            epoch: 7,
            acquired_unix: 1,
        }
    }

    /// A consistent node: one lease, one wired pod, all in place.
    fn healthy() -> Observation {
        let a = att("p1", "10.0.0.1", "10.0.0.0/28", AttachmentState::Wired);
        let (l, r) = wired_kernel(&a);
        Observation {
            node: "n1".into(),
            boot_id: "b1".into(),
            journal_boot_id: Some("b1".into()),
            leases: vec![lease("10.0.0.0/28")],
            live_netns: [a.netns.clone()].into_iter().collect(),
            attachments: vec![a],
            intents: vec![],
            store: Some(vec![store_lease("10.0.0.0/28", "n1")]),
            kernel: KernelView {
                links: vec![l],
                host_routes: vec![r],
                exported: vec![net("10.0.0.0/28")],
            },
            removed: false,
            hold_exports: false,
        }
    }

    fn intent(id: u64, op: IntentOp) -> Intent {
        Intent {
            id,
            op,
            state: IntentState::Pending,
            created_unix: 0,
        }
    }

    #[test]
    fn a_healthy_node_needs_nothing() {
        assert_eq!(plan(&healthy()), vec![]);
    }

    #[test]
    fn a_new_boot_releases_every_attachment_and_republishes() {
        let mut o = healthy();
        o.boot_id = "b2".into();
        o.kernel = KernelView::default();
        o.live_netns.clear();
        let p = plan(&o);
        assert_eq!(
            p,
            vec![
                Action::ExportBlock {
                    block: net("10.0.0.0/28")
                },
                Action::ReleaseAttachment {
                    key: AttachmentKey::new("k8s", "p1", "eth0"),
                    reason: "its boot is over".into()
                },
            ]
        );
    }

    #[test]
    fn pending_wire_rolls_forward_with_netns_and_back_without() {
        let mut o = healthy();
        o.attachments[0].state = AttachmentState::Reserved;
        o.kernel.links.clear();
        o.kernel.host_routes.clear();
        o.intents = vec![intent(
            3,
            IntentOp::Wire {
                key: AttachmentKey::new("k8s", "p1", "eth0"),
            },
        )];
        let p = plan(&o);
        assert_eq!(
            p[0],
            Action::Rewire {
                key: AttachmentKey::new("k8s", "p1", "eth0")
            }
        );
        assert!(matches!(p.last(), Some(Action::DropIntent { id: 3, .. })));
        o.live_netns.clear();
        let p = plan(&o);
        assert!(matches!(&p[0], Action::ReleaseAttachment { .. }), "{p:?}");
        assert!(!p.iter().any(|a| matches!(a, Action::Rewire { .. })));
    }

    #[test]
    fn pending_unwire_rolls_forward() {
        let mut o = healthy();
        o.attachments[0].state = AttachmentState::Releasing;
        o.intents = vec![intent(
            9,
            IntentOp::Unwire {
                key: AttachmentKey::new("k8s", "p1", "eth0"),
            },
        )];
        let p = plan(&o);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(matches!(&p[0], Action::ReleaseAttachment { .. }));
        assert!(matches!(&p[1], Action::DropIntent { id: 9, .. }));
    }

    #[test]
    fn lost_lease_is_reacquired_when_free_and_quarantined_when_taken() {
        let mut o = healthy();
        o.store = Some(vec![]);
        assert_eq!(
            plan(&o),
            vec![Action::ReacquireLease {
                pool: "default".into(),
                block: net("10.0.0.0/28")
            }]
        );
        o.store = Some(vec![store_lease("10.0.0.0/28", "n2")]);
        let p = plan(&o);
        assert_eq!(
            p,
            vec![
                Action::QuarantineLease {
                    block: net("10.0.0.0/28"),
                    owner: "n2".into(),
                    affected: vec!["k8s:p1/eth0".into()]
                },
                Action::WithdrawBlock {
                    block: net("10.0.0.0/28")
                },
            ]
        );
    }

    #[test]
    fn a_removed_node_quarantines_every_block_and_retakes_none() {
        let mut o = healthy();
        // The removal freed the block: the store no longer has it, and the
        // block is free; a node not removed would re-acquire it.
        o.store = Some(vec![]);
        o.removed = true;
        let p = plan(&o);
        assert_eq!(
            p,
            vec![
                Action::QuarantineLease {
                    block: net("10.0.0.0/28"),
                    owner: "(this node was removed: coilctl node remove)".into(),
                    affected: vec!["k8s:p1/eth0".into()]
                },
                Action::WithdrawBlock {
                    block: net("10.0.0.0/28")
                },
            ]
        );
        // Another node leased it since: the same, never a re-acquisition.
        o.store = Some(vec![store_lease("10.0.0.0/28", "n2")]);
        assert_eq!(plan(&o), p);
    }

    #[test]
    fn a_quarantined_block_ours_again_is_adopted_else_forgotten() {
        let mut o = healthy();
        o.attachments.clear();
        o.kernel.links.clear();
        o.kernel.host_routes.clear();
        o.leases[0].state = LeaseState::Quarantined;
        o.kernel.exported.clear();
        // Ours again in the store: adopted and published.
        let p = plan(&o);
        assert!(
            matches!(&p[0], Action::AdoptLease { lease } if lease.block == net("10.0.0.0/28")),
            "{p:?}"
        );
        assert!(p.contains(&Action::ExportBlock {
            block: net("10.0.0.0/28")
        }));
        // Another node's, no pod of ours on it: forgotten.
        o.store = Some(vec![store_lease("10.0.0.0/28", "n2")]);
        assert_eq!(
            plan(&o),
            vec![Action::ForgetLease {
                block: net("10.0.0.0/28")
            }]
        );
    }

    #[test]
    fn unconfirmed_leases_are_not_published_while_the_store_is_away() {
        let mut o = healthy();
        o.kernel.exported.clear();
        o.store = None;
        o.hold_exports = true;
        assert!(!plan(&o)
            .iter()
            .any(|a| matches!(a, Action::ExportBlock { .. })));
        // What the kernel still shows is withdrawn.
        o.kernel.exported = vec![net("10.0.0.0/28")];
        assert!(plan(&o).contains(&Action::WithdrawBlock {
            block: net("10.0.0.0/28")
        }));
        // Once the store answers, the plan decides as usual.
        o.store = Some(vec![store_lease("10.0.0.0/28", "n1")]);
        assert!(!plan(&o)
            .iter()
            .any(|a| matches!(a, Action::WithdrawBlock { .. })));
    }

    #[test]
    fn store_only_lease_is_adopted_when_used_and_released_when_idle() {
        let mut o = healthy();
        // A lease the journal never recorded, used by a kernel route.
        o.store
            .as_mut()
            .expect("store")
            .push(store_lease("10.0.0.16/28", "n1"));
        o.kernel
            .host_routes
            .push((net("10.0.0.17/32"), "coilx".into()));
        let p = plan(&o);
        assert!(p.contains(&Action::AdoptLease {
            lease: store_lease("10.0.0.16/28", "n1")
        }));
        assert!(p.contains(&Action::ExportBlock {
            block: net("10.0.0.16/28")
        }));
        // Idle: released, and last.
        let mut o = healthy();
        o.store
            .as_mut()
            .expect("store")
            .push(store_lease("10.0.0.16/28", "n1"));
        let p = plan(&o);
        assert_eq!(
            p,
            vec![Action::ReleaseStoreLease {
                lease: store_lease("10.0.0.16/28", "n1")
            }]
        );
        // ... unless an acquisition was in flight.
        o.intents = vec![intent(
            4,
            IntentOp::AcquireBlock {
                pool: "default".into(),
                block: None,
            },
        )];
        let p = plan(&o);
        assert!(p.contains(&Action::AdoptLease {
            lease: store_lease("10.0.0.16/28", "n1")
        }));
    }

    #[test]
    fn unreachable_store_changes_no_lease() {
        let mut o = healthy();
        o.store = None;
        o.intents = vec![intent(
            4,
            IntentOp::AcquireBlock {
                pool: "default".into(),
                block: None,
            },
        )];
        assert_eq!(plan(&o), vec![], "the intent stays until the store answers");
    }

    #[test]
    fn attachment_without_kernel_state_is_rewired_or_released() {
        let mut o = healthy();
        o.kernel.links.clear();
        o.kernel.host_routes.clear();
        assert_eq!(
            plan(&o),
            vec![Action::Rewire {
                key: AttachmentKey::new("k8s", "p1", "eth0")
            }]
        );
        o.live_netns.clear();
        let p = plan(&o);
        assert!(matches!(&p[0], Action::ReleaseAttachment { .. }), "{p:?}");
    }

    #[test]
    fn orphans_of_ours_are_removed_and_foreign_ones_kept() {
        let mut o = healthy();
        o.kernel.links.push(HostLink {
            name: "coilorphan00000".into(),
            alias: Some("coil:eth0:gone".into()),
        });
        o.kernel.links.push(HostLink {
            name: "coilnotours0000".into(),
            alias: None,
        });
        o.kernel.links.push(HostLink {
            name: "eth0".into(),
            alias: Some("coil:eth0:x".into()),
        });
        o.kernel
            .host_routes
            .push((net("10.0.0.9/32"), "coilp1".into()));
        o.kernel
            .host_routes
            .push((net("10.0.0.10/32"), "eth9".into()));
        let p = plan(&o);
        assert_eq!(
            p,
            vec![
                Action::RemoveLink {
                    name: "coilorphan00000".into()
                },
                Action::RemoveHostRoute {
                    dst: net("10.0.0.9/32"),
                    dev: "coilp1".into()
                },
            ]
        );
    }

    #[test]
    fn table_drift_is_corrected_both_ways() {
        let mut o = healthy();
        o.kernel.exported = vec![net("10.9.0.0/28")];
        assert_eq!(
            plan(&o),
            vec![
                Action::ExportBlock {
                    block: net("10.0.0.0/28")
                },
                Action::WithdrawBlock {
                    block: net("10.9.0.0/28")
                },
            ]
        );
    }

    #[test]
    fn restoration_comes_before_any_release() {
        let mut o = healthy();
        o.boot_id = "b2".into();
        o.store = Some(vec![store_lease("10.0.0.16/28", "n1")]);
        let p = plan(&o);
        let first_release = p.iter().position(|a| a.phase() >= 3).unwrap_or(p.len());
        assert!(p[..first_release].iter().all(|a| a.phase() < 3));
        assert!(p[first_release..].iter().all(|a| a.phase() >= 3), "{p:?}");
    }

    #[test]
    fn an_interrupted_block_release_is_finished() {
        let mut o = healthy();
        o.attachments.clear();
        o.kernel = KernelView::default();
        o.leases[0].state = LeaseState::Releasing;
        o.intents = vec![intent(
            5,
            IntentOp::ReleaseBlock {
                pool: "default".into(),
                block: net("10.0.0.0/28"),
            },
        )];
        assert_eq!(
            plan(&o),
            vec![
                Action::ReleaseStoreLease {
                    lease: store_lease("10.0.0.0/28", "n1")
                },
                Action::ForgetLease {
                    block: net("10.0.0.0/28")
                },
                Action::DropIntent {
                    id: 5,
                    reason: "release settled".into()
                },
            ]
        );
        // The store already let it go: only the journal record remains.
        o.store = Some(vec![]);
        let p = plan(&o);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(matches!(p[0], Action::ForgetLease { .. }));
    }

    #[test]
    fn half_reserved_without_intent_is_released() {
        let mut o = healthy();
        o.attachments[0].state = AttachmentState::Reserved;
        let p = plan(&o);
        assert!(matches!(&p[0], Action::ReleaseAttachment { .. }), "{p:?}");
    }
}
