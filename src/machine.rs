//! The node as an I/O-free state machine: events in, decisions out.
//!
//! [`NodeMachine`] decides what a node does about a CNI request (ADD, DEL,
//! CHECK, GC), a completed or failed effect, a tick of its clock and a view
//! of the store; it never touches the journal, the store or the kernel.
//! Each call returns an [`Output`]: the journal records to make durable
//! first ([`Output::persist`], one atomic batch, fsynced when
//! [`Output::sync`] says so), then the effects to start, then the answers
//! to give. A driver must keep that order, as raft-rs's drivers do with a
//! `Ready`: *persist before act*. A crash may come between any two steps;
//! [`NodeMachine::start`] rebuilds the machine from what the journal made
//! durable and re-issues every effect a pending intent announces (each
//! effect is idempotent), so the node converges whatever was lost.
//!
//! The allocation itself is [`crate::node::NodeState`], the same code
//! coild reserves addresses with. The cluster simulator (coil-sim) drives
//! this machine on several nodes against a store model, crashing it at
//! every effect boundary (docs/ARCHITECTURE.md, "The node machine").
//!
//! | input | state it needs | records persisted | effects | answer |
//! |---|---|---|---|---|
//! | ADD, new key | confirmed, not removed, free address | Wire intent, Reserved attachment, addresses, leases' cursors | Wire | after Wired |
//! | ADD, no free address | | AcquireBlock intent | Acquire | waits |
//! | Acquired | | lease Leased, intent deleted | (resumes waiting ADDs) | |
//! | Wired | | attachment Wired, intent deleted (unsynced) | | Added |
//! | wire failed | | Unwire intent, attachment Releasing | Unwire | error |
//! | DEL | attachment | Unwire intent, attachment Releasing | Unwire | Deleted |
//! | Unwired | | attachment, addresses, intent deleted | | |
//! | tick | empty block idle 2 ticks, above min | ReleaseBlock intent, lease Releasing | Release | |
//! | View | | adopted leases; lost ones Quarantined | Reacquire for missing keys | |
//! | any event | table 119 differs from the `Leased` blocks | | Export / Withdraw, one per block at a time | |
//! | withdrawal done | a release waits for it | | Release | |

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::errors::ErrorKind;
use crate::journal::{
    AddressEntry, AssignedAddress, Attachment, AttachmentKey, AttachmentState, Batch, BlockLease,
    Intent, IntentOp, IntentState, LeaseState,
};
use crate::kernel::WireSpec;
#[cfg(test)]
use crate::node::veth_alias;
use crate::node::{host_veth_name, wire_spec, NodeState, Reservation};
use crate::store::model::Family;

/// A caller's request, numbered by the driver.
pub type ReqId = u64;
/// An effect the machine asked for, numbered by the machine.
pub type EffectId = u64;

/// One journal record, as data: the machine's decisions are records the
/// driver writes ([`Rec::add_to`]) and a simulator applies to its model of
/// the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rec {
    PutLease(BlockLease),
    DeleteLease(IpNet),
    PutAttachment(Attachment),
    DeleteAttachment(AttachmentKey),
    PutIntent(Intent),
    DeleteIntent(u64),
    PutAddress(IpAddr, AddressEntry),
    DeleteAddress(IpAddr),
}

impl Rec {
    /// Appends this record to a journal batch.
    pub fn add_to(&self, b: &mut Batch) {
        match self {
            Rec::PutLease(l) => b.put_lease(l),
            Rec::DeleteLease(n) => b.delete_lease(*n),
            Rec::PutAttachment(a) => b.put_attachment(a),
            Rec::DeleteAttachment(k) => b.delete_attachment(k),
            Rec::PutIntent(i) => b.put_intent(i),
            Rec::DeleteIntent(id) => b.delete_intent(*id),
            Rec::PutAddress(a, e) => b.put_address(*a, e),
            Rec::DeleteAddress(a) => b.delete_address(*a),
        };
    }
}

/// What the journal holds durably: the machine starts from this.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Durable {
    pub leases: BTreeMap<IpNet, BlockLease>,
    pub attachments: BTreeMap<AttachmentKey, Attachment>,
    pub intents: BTreeMap<u64, Intent>,
    pub addresses: BTreeMap<IpAddr, AddressEntry>,
    /// The node booted since the journal was last written (its node
    /// record names another boot): the store must confirm the leases
    /// before any ADD is served, even when no attachment is left to tell.
    pub rebooted: bool,
    /// The lowest intent id the journal has not handed out: the machine
    /// numbers its intents from here (or past its pending ones), so an id
    /// is never reused while another writer (recovery) may hold it.
    pub next_intent: u64,
}

impl Durable {
    /// Applies one record, as a journal replay does.
    pub fn apply(&mut self, r: &Rec) {
        match r {
            Rec::PutLease(l) => {
                self.leases.insert(l.block, l.clone());
            }
            Rec::DeleteLease(n) => {
                self.leases.remove(n);
            }
            Rec::PutAttachment(a) => {
                self.attachments.insert(a.key.clone(), a.clone());
            }
            Rec::DeleteAttachment(k) => {
                self.attachments.remove(k);
            }
            Rec::PutIntent(i) => {
                self.intents.insert(i.id, i.clone());
            }
            Rec::DeleteIntent(id) => {
                self.intents.remove(id);
            }
            Rec::PutAddress(a, e) => {
                self.addresses.insert(*a, e.clone());
            }
            Rec::DeleteAddress(a) => {
                self.addresses.remove(a);
            }
        }
    }
}

/// An effect on the world, started by the driver after the output's
/// records are durable. Every one is idempotent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Lease a free block of `pool` and `family` in the store, fenced on
    /// this node's removal fence.
    Acquire { pool: String, family: Family },
    /// Lease this exact block again (its key vanished from the store).
    Reacquire { lease: BlockLease },
    /// Withdraw the block from table 119 and delete its store key, fenced
    /// on owner and epoch.
    Release { lease: BlockLease },
    /// Create the pod's veth, addresses and routes. `fresh`: the first
    /// wire of a new reservation, so no earlier wiring of it can exist;
    /// otherwise (a restart, a retried ADD) a complete wiring of this
    /// attachment may be there, and is adopted as it is rather than
    /// replaced under a running pod.
    Wire {
        key: AttachmentKey,
        spec: WireSpec,
        fresh: bool,
    },
    /// Remove the pod's veth (and with it its addresses and routes).
    Unwire {
        key: AttachmentKey,
        host_veth: String,
    },
    /// Read the store's view of this node: the blocks it leases there and
    /// whether it is fenced (removed). `full`: every block of the store
    /// must be looked at (a lease this node lacks may exist: a pending
    /// acquisition, or the first view after a start); otherwise the
    /// blocks the node knows are enough, which costs the store the same
    /// at 5 nodes as at 5,000.
    View { full: bool },
    /// Publish the block in table 119 (routing daemons advertise it).
    Export { block: IpNet },
    /// Remove the block from table 119.
    Withdraw { block: IpNet },
    /// Read which blocks table 119 holds.
    ReadTable,
    /// Look at the kernel state of these wired attachments: is each one's
    /// veth there with a host route to each address, and if not, does its
    /// pod netns still exist?
    Observe { attachments: Vec<Attachment> },
    /// List coil's kernel objects in the host netns: every link named
    /// `coil…` with its alias, and every host route with coil's protocol
    /// id through one of them. What a crash left behind (a veth made for a
    /// reservation that never became durable) is found this way.
    Scan,
    /// Delete a link of coil's that no attachment owns (a [`Effect::Scan`]
    /// found it).
    RemoveLink { name: String },
    /// Delete a coil host route through an attachment's veth that is not
    /// one of its addresses. `oif` is the link's index when scanned (a
    /// link made since has another one, and the delete finds nothing).
    RemoveHostRoute { dst: IpNet, dev: String, oif: u32 },
}

/// How an effect ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `Acquire` or `Reacquire` leased this block.
    Acquired(BlockLease),
    /// `Acquire`: every block of the pool and family is leased.
    Exhausted,
    /// `Reacquire`: another node (`owner`) leases the block now.
    Taken { owner: String },
    /// This node is removed (its removal fence exists).
    Fenced,
    /// The store did not answer. A write may or may not have been applied.
    Unavailable,
    /// `Wire` done.
    Wired,
    /// `Wire` failed and left nothing behind (the pod's netns is gone, or
    /// the kernel refused).
    WireFailed(ErrorKind, String),
    /// `Wire` did not finish in time: the kernel may be half way.
    WireTimedOut,
    /// `Unwire` done (or there was nothing to remove).
    Unwired,
    /// `Release` done, or the key was not ours any more.
    Released,
    /// `Export` or `Withdraw` done.
    Routed,
    /// `Export` or `Withdraw` failed; the table is as it was, or unknown.
    RouteFailed(String),
    /// `ReadTable`: the blocks table 119 holds.
    Table(BTreeSet<IpNet>),
    /// `Observe`: the attachments whose veth or host routes are missing,
    /// each with whether its pod netns still exists.
    Observed(Vec<(AttachmentKey, bool)>),
    /// `Scan`: coil's links (name, alias) and host routes (destination,
    /// output link's name and index).
    Scanned {
        links: Vec<(String, Option<String>)>,
        routes: Vec<(IpNet, String, u32)>,
    },
    /// `RemoveLink` or `RemoveHostRoute` done (or it was gone already).
    Removed,
    /// `RemoveLink` or `RemoveHostRoute` failed; the next scan tries
    /// again.
    RemoveFailed(String),
    /// `View`: the blocks the store says this node leases (with their
    /// pools and epochs), and whether the node is fenced.
    View {
        leases: BTreeMap<IpNet, (String, u64)>,
        fenced: bool,
    },
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Added(Vec<IpAddr>),
    Deleted,
    Checked,
    Collected,
    /// STATUS: ready to serve ADDs.
    Ready,
    Failed(ErrorKind, String),
}

/// Who an ADD is for, recorded with its attachment (listings, the address
/// index). The machine has no clock: the driver stamps `created_unix`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    pub created_unix: u64,
}

/// A request to the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Add {
        key: AttachmentKey,
        netns: String,
        pool: String,
        families: Vec<Family>,
        pod: PodMeta,
    },
    Del {
        key: AttachmentKey,
    },
    Check {
        key: AttachmentKey,
    },
    /// CNI GC of one network: release every attachment of `network` not
    /// in `keep`. Other networks' attachments are not this GC's to judge
    /// (a GC from another network once released every pod of a node).
    Gc {
        network: String,
        keep: BTreeSet<AttachmentKey>,
    },
    /// CNI STATUS: can this node serve an ADD now? Ready when it is not
    /// removed, its blocks are confirmed, and it has a free address or
    /// the store answered its last call (so a block can be leased).
    Status,
}

/// What the driver must do, in this order: persist, start effects, answer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Output {
    pub persist: Vec<Rec>,
    /// The batch must be fsynced before any effect starts or any answer is
    /// given. False only for records whose loss recovery repairs (a Wired
    /// mark: the Reserved record and its Wire intent make recovery wire
    /// the pod again, which finds the veth already there).
    pub sync: bool,
    pub effects: Vec<(EffectId, Effect)>,
    pub answers: Vec<(ReqId, Answer)>,
}

impl Output {
    fn rec(&mut self, r: Rec) {
        self.sync = true;
        self.persist.push(r);
    }
    fn rec_unsynced(&mut self, r: Rec) {
        self.persist.push(r);
    }
}

/// The machine's fixed settings.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub node: String,
    /// This boot's id: attachments of another boot lost their kernel state.
    pub boot_id: String,
    /// Blocks of each pool and family kept leased when idle.
    pub min_blocks: usize,
    pub mtu: u32,
}

/// Why an effect is in flight.
#[derive(Debug, Clone)]
enum Pending {
    /// `releases`: as for [`Pending::View`].
    Acquire {
        pool: String,
        family: Family,
        intent: u64,
        releases: u64,
    },
    Reacquire {
        block: IpNet,
    },
    /// Releasing this incarnation (`epoch`) of the block.
    Release {
        block: IpNet,
        epoch: u64,
        intent: u64,
    },
    Wire {
        key: AttachmentKey,
        intent: u64,
        req: Option<ReqId>,
    },
    Unwire {
        key: AttachmentKey,
        intent: u64,
    },
    /// A store read; `releases` counts the blocks released before it was
    /// asked for, so a view older than a release is not acted on.
    View {
        releases: u64,
        full: bool,
        /// Fences seen before it was asked for: an older view does not
        /// re-admit the node.
        fences: u64,
        /// Acquisitions ended before it was asked for: only those are
        /// settled by it (see `acq_ended`).
        acq_seq: u64,
    },
    /// A change to table 119 for `block` (`export`: publish, else remove).
    Route {
        block: IpNet,
        export: bool,
    },
    ReadTable,
    /// Asked when the change counter was `changes`.
    Observe {
        changes: u64,
    },
    /// Asked when the change counter was `changes`.
    Scan {
        changes: u64,
    },
    /// Removing a link (`name`) or a host route (None).
    Remove {
        link: Option<String>,
    },
}

/// What the machine knows of one block's route in table 119.
#[derive(Debug, Clone, Copy, Default)]
struct Route {
    /// Confirmed: published (true), absent (false), unknown (None).
    exported: Option<bool>,
    /// A change in flight: what it asks for.
    asked: Option<bool>,
}

/// An ADD waiting for a block.
#[derive(Debug, Clone)]
struct Parked {
    req: ReqId,
    key: AttachmentKey,
    netns: String,
    pool: String,
    families: Vec<Family>,
    pod: PodMeta,
    resvs: Vec<Reservation>,
}

/// The node machine. See the module documentation.
#[derive(Debug)]
pub struct NodeMachine {
    cfg: MachineConfig,
    alloc: NodeState,
    /// Pending intents, as durable.
    intents: BTreeMap<u64, Intent>,
    next_intent: u64,
    next_effect: EffectId,
    /// The node's removal fence was seen: serve no address.
    removed: bool,
    /// Booted and the store has not confirmed the leases yet.
    unconfirmed: bool,
    inflight: BTreeMap<EffectId, Pending>,
    parked: Vec<Parked>,
    acquiring: BTreeSet<(String, Family)>,
    /// Keys with a Wire or Unwire in flight, or an ADD parked.
    busy: BTreeSet<AttachmentKey>,
    /// Ticks each block has been seen empty.
    idle: BTreeMap<IpNet, u32>,
    /// Blocks released so far (see [`Pending::View`]).
    releases: u64,
    /// Table 119 as far as known, per block; `table_known` once read after
    /// the start. At most one change per block is in flight, so changes
    /// happen in the order they were decided.
    table: BTreeMap<IpNet, Route>,
    table_known: bool,
    /// The store answered the last call made to it.
    store_ok: bool,
    /// A full view has been read since the start.
    viewed_full: bool,
    /// Times the removal fence was seen.
    fences: u64,
    /// When each attachment last changed (a count of changes): an
    /// observation of the kernel older than that is not acted on.
    touched: BTreeMap<AttachmentKey, u64>,
    changes: u64,
    /// Ticks since the start; a [`Effect::Scan`] every [`SCAN_EVERY`].
    ticks: u64,
    /// Host veth names whose attachment changed (was made, re-wired or
    /// removed) while a scan is in flight: a scan's listing of such a
    /// link is stale, and it is not removed on it.
    scan_touched: BTreeSet<String>,
    /// Links being removed: an ADD whose veth has that name waits.
    removing: BTreeSet<String>,
    /// Counts the ends of `Acquire` effects; `acq_ended` holds, per
    /// pending AcquireBlock intent, the count when its last one ended. A
    /// view asked for before that may have read the store before the
    /// acquisition's write landed: it must not settle the intent (the
    /// simulator found the lease leaked that way, after an ambiguous
    /// answer).
    acq_seq: u64,
    acq_ended: BTreeMap<u64, u64>,
    /// Who holds each block this node lost, as far as known (events and
    /// logs name the owner).
    lost_to: BTreeMap<IpNet, String>,
}

/// A tick in this many asks for a [`Effect::Scan`] of the kernel (and
/// the start does): a listing of every link costs the kernel per veth.
pub const SCAN_EVERY: u64 = 10;

impl NodeMachine {
    /// The machine of a node whose journal holds `durable`, after a start
    /// (coild started, crashed and restarted, or the node rebooted: then
    /// `cfg.boot_id` differs from the attachments'). The output rolls every
    /// pending intent forward or back and asks the store for its view.
    pub fn start(cfg: MachineConfig, durable: &Durable) -> (NodeMachine, Output) {
        let mut out = Output::default();
        let rebooted = durable.rebooted
            || durable
                .attachments
                .values()
                .any(|a| a.boot_id != cfg.boot_id);
        let mut m = NodeMachine {
            next_intent: durable
                .intents
                .keys()
                .next_back()
                .map_or(1, |i| i + 1)
                .max(durable.next_intent),
            alloc: NodeState::from_records(durable.leases.values().cloned().collect(), Vec::new()),
            intents: durable.intents.clone(),
            cfg,
            next_effect: 1,
            removed: false,
            unconfirmed: rebooted,
            inflight: BTreeMap::new(),
            parked: Vec::new(),
            acquiring: BTreeSet::new(),
            busy: BTreeSet::new(),
            idle: BTreeMap::new(),
            releases: 0,
            table: BTreeMap::new(),
            table_known: false,
            store_ok: true,
            viewed_full: false,
            fences: 0,
            touched: BTreeMap::new(),
            changes: 0,
            ticks: 0,
            scan_touched: BTreeSet::new(),
            removing: BTreeSet::new(),
            acq_seq: 0,
            acq_ended: BTreeMap::new(),
            lost_to: BTreeMap::new(),
        };
        for a in durable.attachments.values() {
            if a.boot_id != m.cfg.boot_id {
                // Its veth died with the boot: release it without an unwire.
                m.forget(&mut out, a);
                continue;
            }
            m.alloc.insert_attachment(a.clone());
            m.touch(&a.key);
        }
        // Every intent whose attachment is gone (released above) goes too.
        let stale: Vec<u64> = m
            .intents
            .values()
            .filter(|i| match &i.op {
                IntentOp::Wire { key } => m
                    .alloc
                    .attachment(key)
                    .is_none_or(|a| a.state == AttachmentState::Releasing),
                IntentOp::Unwire { key } => m.alloc.attachment(key).is_none(),
                _ => false,
            })
            .map(|i| i.id)
            .collect();
        for id in stale {
            m.intents.remove(&id);
            out.rec(Rec::DeleteIntent(id));
        }
        // Roll forward what was half done. Attachments first.
        let atts: Vec<Attachment> = m.alloc.attachments().cloned().collect();
        for a in atts {
            match a.state {
                AttachmentState::Wired => {}
                AttachmentState::Reserved => {
                    let intent = m.intent_for(&a.key, true);
                    m.start_wire(&mut out, &a, intent, None, false);
                }
                AttachmentState::Releasing => {
                    let intent = m.intent_for(&a.key, false);
                    m.start_unwire(&mut out, &a, intent);
                }
            }
        }
        let releasing: Vec<(u64, IpNet)> = m
            .intents
            .values()
            .filter_map(|i| match &i.op {
                IntentOp::ReleaseBlock { block, .. } => Some((i.id, *block)),
                _ => None,
            })
            .collect();
        for (intent, block) in releasing {
            m.start_release(&mut out, block, intent);
        }
        // A pending AcquireBlock is settled by the view (adopts a lease the
        // store gave and the journal lacks).
        m.view(&mut out);
        // Table 119 may hold anything a crash left: read it, then make it
        // the leased blocks.
        m.effect(&mut out, Pending::ReadTable, Effect::ReadTable);
        // The wired pods' veths, as a crash or an operator left them; and
        // what a crash left in the kernel that no record owns.
        m.observe(&mut out);
        m.scan(&mut out);
        (m, out)
    }

    /// The allocation state (for drivers' listings and tests).
    pub fn state(&self) -> &NodeState {
        &self.alloc
    }

    /// Who leases a block this node lost (quarantined), when the store
    /// said so.
    pub fn lost_to(&self, block: &IpNet) -> Option<&str> {
        self.lost_to.get(block).map(String::as_str)
    }

    /// Is the node fenced off (removed)?
    pub fn removed(&self) -> bool {
        self.removed
    }

    /// The highest intent id the machine may have used so far.
    pub fn last_intent(&self) -> u64 {
        self.next_intent.saturating_sub(1)
    }

    /// Has the store not yet confirmed the leases since a reboot?
    pub fn unconfirmed(&self) -> bool {
        self.unconfirmed
    }

    /// Did the store answer the last call made to it?
    pub fn store_ok(&self) -> bool {
        self.store_ok
    }

    fn fenced_msg(&self) -> String {
        format!(
            "node {} was removed from the cluster and serves no address until \
             `coilctl node readmit {}`",
            self.cfg.node, self.cfg.node
        )
    }

    /// Effects in flight.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// A request from a caller.
    pub fn request(&mut self, req: ReqId, r: Request) -> Output {
        let mut out = Output::default();
        match r {
            Request::Add {
                key,
                netns,
                pool,
                families,
                pod,
            } => self.add(
                &mut out,
                Parked {
                    req,
                    key,
                    netns,
                    pool,
                    families,
                    pod,
                    resvs: Vec::new(),
                },
            ),
            Request::Del { key } => {
                let a = self.del(&mut out, &key);
                out.answers.push((req, a));
            }
            Request::Check { key } => {
                let a = match self.alloc.lookup(&key) {
                    Some(a) if a.state == AttachmentState::Wired && !self.busy.contains(&a.key) => {
                        Answer::Checked
                    }
                    Some(a) => Answer::Failed(
                        ErrorKind::CheckFailed,
                        format!("attachment {} is {:?}", a.key, a.state),
                    ),
                    None => Answer::Failed(
                        ErrorKind::CheckFailed,
                        format!("no attachment {key} on this node"),
                    ),
                };
                out.answers.push((req, a));
            }
            Request::Gc { network, keep } => {
                let gone: Vec<AttachmentKey> = self
                    .alloc
                    .attachments()
                    .filter(|a| {
                        a.key.network == network
                            && !keep.contains(&a.key)
                            && a.state != AttachmentState::Releasing
                    })
                    .map(|a| a.key.clone())
                    .collect();
                for k in gone {
                    let _ = self.del(&mut out, &k);
                }
                out.answers.push((req, Answer::Collected));
            }
            Request::Status => {
                let a = if self.removed {
                    Answer::Failed(ErrorKind::Fenced, self.fenced_msg())
                } else if self.unconfirmed {
                    Answer::Failed(
                        ErrorKind::TryAgain,
                        "the store has not confirmed this node's blocks since its reboot".into(),
                    )
                } else if self.alloc.free_addresses() == 0 && !self.store_ok {
                    Answer::Failed(
                        ErrorKind::TryAgain,
                        "no free address on this node and the store did not answer".into(),
                    )
                } else {
                    Answer::Ready
                };
                out.answers.push((req, a));
            }
        }
        self.sync_table(&mut out);
        out
    }

    /// A tick of the node's clock: idle blocks are released, effects that
    /// failed are retried, the store's view is read again.
    pub fn tick(&mut self) -> Output {
        let mut out = Output::default();
        // Unwires that failed are retried.
        let releasing: Vec<Attachment> = self
            .alloc
            .attachments()
            .filter(|a| a.state == AttachmentState::Releasing && !self.busy.contains(&a.key))
            .cloned()
            .collect();
        for a in releasing {
            let intent = self.intent_for(&a.key, false);
            self.start_unwire(&mut out, &a, intent);
        }
        // Releases that failed are retried.
        let retry: Vec<(u64, IpNet)> = self
            .intents
            .values()
            .filter_map(|i| match &i.op {
                IntentOp::ReleaseBlock { block, .. } => Some((i.id, *block)),
                _ => None,
            })
            .filter(|(_, b)| {
                !self
                    .inflight
                    .values()
                    .any(|p| matches!(p, Pending::Release { block, .. } if block == b))
            })
            .collect();
        for (intent, block) in retry {
            self.start_release(&mut out, block, intent);
        }
        // Quarantined blocks nobody uses any more are forgotten.
        let dropped: Vec<IpNet> = self
            .alloc
            .blocks()
            .filter(|b| b.lease.state == LeaseState::Quarantined && b.used.is_empty())
            .map(|b| b.lease.block)
            .filter(|b| self.withdrawn(b))
            .collect();
        for b in dropped {
            self.alloc.remove_lease(&b);
            self.lost_to.remove(&b);
            out.rec(Rec::DeleteLease(b));
        }
        self.release_idle(&mut out);
        self.view(&mut out);
        self.observe(&mut out);
        self.ticks += 1;
        if self.ticks.is_multiple_of(SCAN_EVERY) {
            self.scan(&mut out);
        }
        // Table 119 is read again: drift (a route deleted by hand) is
        // repaired within a tick.
        if self.table_known
            && !self
                .inflight
                .values()
                .any(|p| matches!(p, Pending::ReadTable))
        {
            self.effect(&mut out, Pending::ReadTable, Effect::ReadTable);
        }
        self.sync_table(&mut out);
        out
    }

    /// An effect ended.
    pub fn done(&mut self, id: EffectId, outcome: Outcome) -> Output {
        let mut out = Output::default();
        let Some(p) = self.inflight.remove(&id) else {
            return out;
        };
        if matches!(
            p,
            Pending::Acquire { .. }
                | Pending::Reacquire { .. }
                | Pending::Release { .. }
                | Pending::View { .. }
        ) {
            self.store_ok = outcome != Outcome::Unavailable;
        }
        match p {
            Pending::Acquire {
                pool,
                family,
                intent,
                releases,
            } => {
                // An answer older than a release may name the incarnation
                // that was released meanwhile (a view adopted it first):
                // it is not trusted; the intent stays and the next view
                // adopts the lease if it is really this node's.
                // Nor is one naming the incarnation this node is
                // releasing (a view adopted it, and it went idle).
                let outcome = match outcome {
                    Outcome::Acquired(l)
                        if releases != self.releases
                            && !self.alloc.blocks().any(|b| b.lease.block == l.block) =>
                    {
                        Outcome::Unavailable
                    }
                    Outcome::Acquired(l)
                        if self.alloc.blocks().any(|b| {
                            b.lease.block == l.block
                                && b.lease.epoch == l.epoch
                                && b.lease.state != LeaseState::Leased
                        }) =>
                    {
                        Outcome::Unavailable
                    }
                    o => o,
                };
                self.acquired(&mut out, pool, family, intent, outcome)
            }
            Pending::Reacquire { block } => self.reacquired(&mut out, block, outcome),
            Pending::Release {
                block,
                epoch,
                intent,
            } => {
                if outcome == Outcome::Released {
                    self.releases += 1;
                    // Only the incarnation released goes: the block may
                    // have been leased afresh meanwhile.
                    let same = self
                        .alloc
                        .blocks()
                        .any(|b| b.lease.block == block && b.lease.epoch == epoch);
                    if same {
                        self.alloc.remove_lease(&block);
                        self.idle.remove(&block);
                        out.rec(Rec::DeleteLease(block));
                    }
                    if self.intents.remove(&intent).is_some() {
                        out.rec(Rec::DeleteIntent(intent));
                    }
                }
                // Otherwise retried on a later tick; the block stays
                // Releasing.
            }
            Pending::Wire { key, intent, req } => self.wired(&mut out, key, intent, req, outcome),
            Pending::Unwire { key, intent } => {
                self.busy.remove(&key);
                if outcome == Outcome::Unwired {
                    self.touch(&key);
                    self.touched.remove(&key);
                    if let Some(a) = self.alloc.remove_attachment(&key) {
                        for x in &a.addresses {
                            out.rec(Rec::DeleteAddress(x.addr));
                        }
                    }
                    out.rec(Rec::DeleteAttachment(key.clone()));
                    if intent != 0 {
                        self.intents.remove(&intent);
                        out.rec(Rec::DeleteIntent(intent));
                    }
                    // A Wire intent left by a wire that timed out is spent
                    // with the attachment.
                    self.drop_intents_of(&mut out, &key);
                }
            }
            Pending::Route { block, export } => {
                let r = self.table.entry(block).or_default();
                r.asked = None;
                r.exported = match outcome {
                    Outcome::Routed => Some(export),
                    _ => None,
                };
                // A release waiting for the withdrawal goes on.
                if self.withdrawn(&block) {
                    let waiting: Vec<u64> = self
                        .intents
                        .values()
                        .filter(|i| matches!(&i.op, IntentOp::ReleaseBlock { block: b, .. } if *b == block))
                        .map(|i| i.id)
                        .collect();
                    for intent in waiting {
                        self.start_release(&mut out, block, intent);
                    }
                }
            }
            Pending::Observe { changes } => {
                if let Outcome::Observed(missing) = outcome {
                    self.observed(&mut out, changes, missing);
                }
            }
            Pending::Scan { changes } => {
                if let Outcome::Scanned { links, routes } = outcome {
                    self.scanned(&mut out, changes, links, routes);
                }
                self.scan_touched.clear();
            }
            Pending::Remove { link } => {
                if let Some(name) = link {
                    self.removing.remove(&name);
                }
            }
            Pending::ReadTable => {
                if let Outcome::Table(blocks) = outcome {
                    self.table_known = true;
                    for b in &blocks {
                        self.table.entry(*b).or_default();
                    }
                    // The table as read, for every block with no change in
                    // flight: a route someone deleted or added by hand is
                    // put right by the next sync. A read older than a
                    // change that finished since only causes that change
                    // again (each is idempotent).
                    for (b, r) in self.table.iter_mut() {
                        if r.asked.is_none() {
                            r.exported = Some(blocks.contains(b));
                        }
                    }
                } else {
                    self.effect(&mut out, Pending::ReadTable, Effect::ReadTable);
                }
            }
            Pending::View {
                releases,
                full,
                fences,
                acq_seq,
            } => {
                // A view read before a release may still show the block:
                // adopting it again would take a block another node may
                // lease now. The next tick asks again.
                if releases == self.releases {
                    self.viewed(&mut out, outcome, full, fences, acq_seq)
                }
            }
        }
        self.sync_table(&mut out);
        out
    }

    /// Is the block known to be absent from table 119, with no change in
    /// flight?
    fn withdrawn(&self, block: &IpNet) -> bool {
        self.table_known
            && self
                .table
                .get(block)
                .is_none_or(|r| r.exported == Some(false) && r.asked.is_none())
    }

    /// Makes table 119 hold exactly the blocks leased (state `Leased`):
    /// one change per block at a time, and only once the table is known.
    fn sync_table(&mut self, out: &mut Output) {
        if !self.table_known {
            return;
        }
        // Until the store confirmed the leases after a reboot, nothing is
        // published: the node may have been removed while it was off and
        // its blocks given to another node (found by the simulator: a
        // node powered on again, cut off, advertised a block it had lost).
        let leased: BTreeSet<IpNet> = self
            .alloc
            .blocks()
            .filter(|b| b.lease.state == LeaseState::Leased && !self.unconfirmed)
            .map(|b| b.lease.block)
            .collect();
        let blocks: BTreeSet<IpNet> = leased
            .iter()
            .copied()
            .chain(self.table.keys().copied())
            .collect();
        for b in blocks {
            let want = leased.contains(&b);
            let r = self.table.entry(b).or_default();
            if r.asked.is_some() || r.exported == Some(want) {
                continue;
            }
            r.asked = Some(want);
            let e = if want {
                Effect::Export { block: b }
            } else {
                Effect::Withdraw { block: b }
            };
            self.effect(
                out,
                Pending::Route {
                    block: b,
                    export: want,
                },
                e,
            );
        }
        // Forget blocks known absent that nothing leases.
        self.table
            .retain(|b, r| leased.contains(b) || r.asked.is_some() || r.exported != Some(false));
    }

    fn effect(&mut self, out: &mut Output, p: Pending, e: Effect) {
        let id = self.next_effect;
        self.next_effect += 1;
        self.inflight.insert(id, p);
        out.effects.push((id, e));
    }

    fn new_intent(&mut self, out: &mut Output, op: IntentOp) -> u64 {
        let id = self.next_intent;
        self.next_intent += 1;
        let i = Intent {
            id,
            op,
            state: IntentState::Pending,
            created_unix: 0,
        };
        self.intents.insert(id, i.clone());
        out.rec(Rec::PutIntent(i));
        id
    }

    /// The pending Wire (or Unwire) intent of `key`, or 0 when the record
    /// has none (its effect is re-issued all the same).
    fn intent_for(&self, key: &AttachmentKey, wire: bool) -> u64 {
        self.intents
            .values()
            .find(|i| match &i.op {
                IntentOp::Wire { key: k } => wire && k == key,
                IntentOp::Unwire { key: k } => !wire && k == key,
                _ => false,
            })
            .map_or(0, |i| i.id)
    }

    /// A new ADD: `p` has reserved nothing yet.
    fn add(&mut self, out: &mut Output, p: Parked) {
        let (req, key) = (p.req, p.key.clone());
        if self.busy.contains(&key) || self.removing.contains(&host_veth_name(&key)) {
            out.answers.push((
                req,
                Answer::Failed(
                    ErrorKind::TryAgain,
                    format!("attachment {key} has an operation in flight; retry"),
                ),
            ));
            return;
        }
        if let Some(a) = self.alloc.lookup(&key).cloned() {
            match a.state {
                AttachmentState::Wired => {
                    out.answers.push((req, Answer::Added(addrs(&a))));
                }
                AttachmentState::Releasing => out.answers.push((
                    req,
                    Answer::Failed(
                        ErrorKind::TryAgain,
                        format!("attachment {key} is being deleted; retry the ADD"),
                    ),
                )),
                AttachmentState::Reserved => {
                    // Reserved but never wired: wire it with the same
                    // addresses.
                    let intent = self.new_intent(out, IntentOp::Wire { key: a.key.clone() });
                    self.start_wire(out, &a, intent, Some(req), false);
                }
            }
            return;
        }
        if self.removed {
            out.answers
                .push((req, Answer::Failed(ErrorKind::Fenced, self.fenced_msg())));
            return;
        }
        if self.unconfirmed {
            out.answers.push((
                req,
                Answer::Failed(
                    ErrorKind::TryAgain,
                    "this node rebooted and the store has not confirmed its blocks yet".into(),
                ),
            ));
            return;
        }
        if p.families.is_empty() {
            out.answers.push((
                req,
                Answer::Failed(
                    ErrorKind::Internal,
                    format!("ADD of {key} names no address family"),
                ),
            ));
            return;
        }
        self.busy.insert(key);
        self.advance(out, p);
    }

    /// Reserves what a parked ADD still lacks; parks it again behind an
    /// acquisition, or records and wires it.
    fn advance(&mut self, out: &mut Output, mut p: Parked) {
        // A block quarantined while the ADD waited is not ours to give.
        let alloc = &mut self.alloc;
        p.resvs.retain(|r| {
            let ok = alloc
                .blocks()
                .any(|b| b.lease.block == r.block && b.lease.state == LeaseState::Leased);
            if !ok {
                alloc.unreserve(r);
            }
            ok
        });
        for family in p.families.clone() {
            if p.resvs.iter().any(|r| Family::of(&r.block) == family) {
                continue;
            }
            match self.alloc.reserve(&p.pool, family) {
                Some(r) => p.resvs.push(r),
                None => {
                    let k = (p.pool.clone(), family);
                    if !self.acquiring.contains(&k) {
                        self.acquiring.insert(k);
                        let intent = self.new_intent(
                            out,
                            IntentOp::AcquireBlock {
                                pool: p.pool.clone(),
                                block: None,
                            },
                        );
                        let releases = self.releases;
                        self.effect(
                            out,
                            Pending::Acquire {
                                pool: p.pool.clone(),
                                family,
                                intent,
                                releases,
                            },
                            Effect::Acquire {
                                pool: p.pool.clone(),
                                family,
                            },
                        );
                    }
                    self.parked.push(p);
                    return;
                }
            }
        }
        let att = Attachment {
            host_veth: host_veth_name(&p.key),
            key: p.key.clone(),
            netns: p.netns.clone(),
            pod_namespace: p.pod.namespace.clone(),
            pod_name: p.pod.name.clone(),
            pool: p.pool.clone(),
            addresses: p
                .resvs
                .iter()
                .map(|r| AssignedAddress {
                    addr: r.addr,
                    block: r.block,
                })
                .collect(),
            state: AttachmentState::Reserved,
            boot_id: self.cfg.boot_id.clone(),
            created_unix: p.pod.created_unix,
        };
        let intent = self.new_intent(out, IntentOp::Wire { key: p.key.clone() });
        out.rec(Rec::PutAttachment(att.clone()));
        for r in &p.resvs {
            out.rec(Rec::PutAddress(
                r.addr,
                AddressEntry {
                    attachment: p.key.clone(),
                    block: r.block,
                },
            ));
        }
        // The leases' cursors, as they are now (never a stale state).
        let blocks: BTreeSet<IpNet> = p.resvs.iter().map(|r| r.block).collect();
        for b in self
            .alloc
            .blocks()
            .filter(|b| blocks.contains(&b.lease.block))
        {
            out.persist.push(Rec::PutLease(b.lease.clone()));
        }
        self.alloc.insert_attachment(att.clone());
        self.touch(&p.key);
        self.busy.remove(&p.key);
        self.start_wire(out, &att, intent, Some(p.req), true);
    }

    fn start_wire(
        &mut self,
        out: &mut Output,
        a: &Attachment,
        intent: u64,
        req: Option<ReqId>,
        fresh: bool,
    ) {
        self.busy.insert(a.key.clone());
        let spec = wire_spec(a, self.cfg.mtu);
        self.effect(
            out,
            Pending::Wire {
                key: a.key.clone(),
                intent,
                req,
            },
            Effect::Wire {
                key: a.key.clone(),
                spec,
                fresh,
            },
        );
    }

    fn start_unwire(&mut self, out: &mut Output, a: &Attachment, intent: u64) {
        self.busy.insert(a.key.clone());
        self.effect(
            out,
            Pending::Unwire {
                key: a.key.clone(),
                intent,
            },
            Effect::Unwire {
                key: a.key.clone(),
                host_veth: a.host_veth.clone(),
            },
        );
    }

    fn start_release(&mut self, out: &mut Output, block: IpNet, intent: u64) {
        let lease = self
            .alloc
            .blocks()
            .find(|b| b.lease.block == block && b.lease.state == LeaseState::Releasing)
            .map(|b| b.lease.clone());
        let Some(lease) = lease else {
            // Gone from the journal, or leased afresh since: the intent
            // is spent.
            self.intents.remove(&intent);
            out.rec(Rec::DeleteIntent(intent));
            return;
        };
        // Never give a block back while table 119 may still publish it
        // (another node could lease it and both would advertise it): the
        // withdrawal comes first, and its completion starts this again.
        if !self.withdrawn(&block)
            || self
                .inflight
                .values()
                .any(|p| matches!(p, Pending::Release { block: b, .. } if *b == block))
        {
            return;
        }
        self.effect(
            out,
            Pending::Release {
                block,
                epoch: lease.epoch,
                intent,
            },
            Effect::Release { lease },
        );
    }

    fn del(&mut self, out: &mut Output, key: &AttachmentKey) -> Answer {
        // A DEL of an attachment already being released (its Releasing
        // record is durable) is done: DEL is idempotent.
        let found = self.alloc.lookup(key).cloned();
        if found
            .as_ref()
            .is_some_and(|a| a.state == AttachmentState::Releasing)
        {
            return Answer::Deleted;
        }
        if self.busy.contains(key) {
            return Answer::Failed(
                ErrorKind::TryAgain,
                format!("attachment {key} has an operation in flight; retry the DEL"),
            );
        }
        let Some(a) = found else {
            return Answer::Deleted;
        };
        self.begin_release(out, a);
        Answer::Deleted
    }

    /// Starts releasing an attachment: its Unwire intent and Releasing
    /// state are persisted, then the Unwire runs; its addresses are freed
    /// only when the Unwire is done.
    fn begin_release(&mut self, out: &mut Output, a: Attachment) {
        let releasing = Attachment {
            state: AttachmentState::Releasing,
            ..a
        };
        let intent = self.new_intent(
            out,
            IntentOp::Unwire {
                key: releasing.key.clone(),
            },
        );
        out.rec(Rec::PutAttachment(releasing.clone()));
        self.alloc.insert_attachment(releasing.clone());
        self.touch(&releasing.key);
        if crate::planted::on(crate::planted::Bug::ReuseWhileTearingDown) {
            // Planted (tests only): free the addresses now, while the
            // veth still holds them.
            let mut freed = releasing.clone();
            freed.addresses.clear();
            self.alloc.remove_attachment(&releasing.key);
            self.alloc.insert_attachment(freed);
        }
        self.start_unwire(out, &releasing, intent);
    }

    /// Releases an attachment whose kernel state is gone (a previous boot's).
    fn forget(&mut self, out: &mut Output, a: &Attachment) {
        out.rec(Rec::DeleteAttachment(a.key.clone()));
        for x in &a.addresses {
            out.rec(Rec::DeleteAddress(x.addr));
        }
    }

    fn acquired(
        &mut self,
        out: &mut Output,
        pool: String,
        family: Family,
        intent: u64,
        outcome: Outcome,
    ) {
        self.acquiring.remove(&(pool.clone(), family));
        self.acq_seq += 1;
        let failure = match outcome {
            Outcome::Acquired(lease) => {
                self.intents.remove(&intent);
                out.rec(Rec::PutLease(lease.clone()));
                out.rec(Rec::DeleteIntent(intent));
                self.cancel_release(out, lease.block);
                self.alloc.insert_lease(lease);
                None
            }
            Outcome::Exhausted => {
                self.intents.remove(&intent);
                out.rec(Rec::DeleteIntent(intent));
                Some((
                    ErrorKind::Exhausted,
                    format!("pool {pool} is exhausted: no {family} block is free"),
                ))
            }
            Outcome::Fenced => {
                self.intents.remove(&intent);
                out.rec(Rec::DeleteIntent(intent));
                self.fence(out);
                Some((ErrorKind::Fenced, self.fenced_msg()))
            }
            // The store may have leased a block it could not confirm: the
            // intent stays until a view asked for after now adopts or
            // settles it.
            _ => {
                self.acq_ended.insert(intent, self.acq_seq);
                Some((
                    ErrorKind::TryAgain,
                    format!("the store did not answer acquiring a {family} block of {pool}"),
                ))
            }
        };
        let (waiting, rest): (Vec<Parked>, Vec<Parked>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|p| p.pool == pool && p.families.contains(&family));
        self.parked = rest;
        for p in waiting {
            match &failure {
                None => self.advance(out, p),
                Some((kind, msg)) => self.give_up(out, p, *kind, msg.clone()),
            }
        }
    }

    /// A block leased afresh while an earlier incarnation's release was
    /// pending (that release was applied, its answer lost): the release
    /// is spent and must never delete the new lease.
    fn cancel_release(&mut self, out: &mut Output, block: IpNet) {
        self.drop_intents(
            out,
            |i| matches!(&i.op, IntentOp::ReleaseBlock { block: b, .. } if *b == block),
        );
    }

    /// Deletes every Wire and Unwire intent of `key`.
    fn drop_intents_of(&mut self, out: &mut Output, key: &AttachmentKey) {
        self.drop_intents(out, |i| {
            matches!(&i.op, IntentOp::Wire { key: k } | IntentOp::Unwire { key: k } if k == key)
        });
    }

    /// Asks to look at the wired, idle attachments' kernel state (unless a
    /// look is in flight): a veth or a host route gone is rebuilt while
    /// the pod's netns lives, and the attachment released once the netns
    /// is gone too (a pod deleted without a DEL).
    fn observe(&mut self, out: &mut Output) {
        let wired: Vec<Attachment> = self
            .alloc
            .attachments()
            .filter(|a| a.state == AttachmentState::Wired && !self.busy.contains(&a.key))
            .cloned()
            .collect();
        if !wired.is_empty()
            && !self
                .inflight
                .values()
                .any(|p| matches!(p, Pending::Observe { .. }))
        {
            let changes = self.changes;
            self.effect(
                out,
                Pending::Observe { changes },
                Effect::Observe { attachments: wired },
            );
        }
    }

    /// Notes that an attachment changed (see `touched`).
    fn touch(&mut self, key: &AttachmentKey) {
        self.changes += 1;
        self.touched.insert(key.clone(), self.changes);
        if self.scanning() {
            let veth = self
                .alloc
                .attachment(key)
                .map_or_else(|| host_veth_name(key), |a| a.host_veth.clone());
            self.scan_touched.insert(veth);
        }
    }

    fn scanning(&self) -> bool {
        self.inflight
            .values()
            .any(|p| matches!(p, Pending::Scan { .. }))
    }

    /// Asks for a listing of coil's kernel objects, unless one is in
    /// flight.
    fn scan(&mut self, out: &mut Output) {
        if self.scanning() {
            return;
        }
        self.scan_touched.clear();
        let changes = self.changes;
        self.effect(out, Pending::Scan { changes }, Effect::Scan);
    }

    /// Acts on a scan asked for at change count `changes`: a coil link no
    /// attachment owns is removed, and so is a coil host route through an
    /// attachment's veth to an address that is not the attachment's. Only
    /// coil's own objects (name `coil…` and alias `coil:…`, coil's route
    /// protocol), and nothing that changed since the scan was asked for:
    /// a link listed then may be a new pod's by now.
    fn scanned(
        &mut self,
        out: &mut Output,
        changes: u64,
        links: Vec<(String, Option<String>)>,
        routes: Vec<(IpNet, String, u32)>,
    ) {
        let owned: BTreeMap<&str, &Attachment> = self
            .alloc
            .attachments()
            .map(|a| (a.host_veth.as_str(), a))
            .collect();
        let busy: BTreeSet<String> = self.busy.iter().map(host_veth_name).collect();
        let mut remove = Vec::new();
        for (name, alias) in links {
            let ours = name.starts_with("coil")
                && alias.as_deref().is_some_and(|a| a.starts_with("coil:"));
            if ours
                && !owned.contains_key(name.as_str())
                && !busy.contains(&name)
                && !self.scan_touched.contains(&name)
                && !self.removing.contains(&name)
            {
                remove.push(Effect::RemoveLink { name });
            }
        }
        for (dst, dev, oif) in routes {
            let Some(a) = owned.get(dev.as_str()) else {
                continue;
            };
            let unchanged = self.touched.get(&a.key).is_some_and(|t| *t <= changes);
            if unchanged
                && a.state == AttachmentState::Wired
                && !self.busy.contains(&a.key)
                && !a.addresses.iter().any(|x| IpNet::from(x.addr) == dst)
            {
                remove.push(Effect::RemoveHostRoute { dst, dev, oif });
            }
        }
        for e in remove {
            let link = match &e {
                Effect::RemoveLink { name } => {
                    self.removing.insert(name.clone());
                    Some(name.clone())
                }
                _ => None,
            };
            self.effect(out, Pending::Remove { link }, e);
        }
    }

    /// Acts on what an observation asked for at change count `changes`
    /// found missing: only for an attachment still wired, idle and
    /// unchanged since (a pod deleted and added again meanwhile under the
    /// same key is another attachment, whatever its old netns did).
    fn observed(&mut self, out: &mut Output, changes: u64, missing: Vec<(AttachmentKey, bool)>) {
        for (key, alive) in missing {
            let unchanged = self.touched.get(&key).is_some_and(|t| *t <= changes);
            let Some(a) = self.alloc.attachment(&key).cloned() else {
                continue;
            };
            if !unchanged || a.state != AttachmentState::Wired || self.busy.contains(&key) {
                continue;
            }
            if alive {
                // Rebuilt in place (create-or-verify), as a restart would.
                let intent = self.new_intent(out, IntentOp::Wire { key: key.clone() });
                self.start_wire(out, &a, intent, None, false);
            } else {
                self.begin_release(out, a);
            }
        }
    }

    /// Deletes every AcquireBlock intent with no acquisition in flight
    /// whose last acquisition ended before `acq_seq`: what the store did
    /// with it is known (a full view asked for after that, or the fence).
    fn drop_settled_acquisitions(&mut self, out: &mut Output, acq_seq: u64) {
        let acquiring: BTreeSet<u64> = self
            .inflight
            .values()
            .filter_map(|p| match p {
                Pending::Acquire { intent, .. } => Some(*intent),
                _ => None,
            })
            .collect();
        let ended = std::mem::take(&mut self.acq_ended);
        self.drop_intents(out, |i| {
            matches!(i.op, IntentOp::AcquireBlock { .. })
                && !acquiring.contains(&i.id)
                && ended.get(&i.id).is_none_or(|e| *e <= acq_seq)
        });
        self.acq_ended = ended;
        let pending = &self.intents;
        self.acq_ended.retain(|id, _| pending.contains_key(id));
    }

    /// Deletes the pending intents `spent` picks, here and in the journal.
    fn drop_intents(&mut self, out: &mut Output, spent: impl Fn(&Intent) -> bool) {
        let ids: Vec<u64> = self
            .intents
            .values()
            .filter(|i| spent(i))
            .map(|i| i.id)
            .collect();
        for id in ids {
            self.intents.remove(&id);
            out.rec(Rec::DeleteIntent(id));
        }
    }

    fn give_up(&mut self, out: &mut Output, p: Parked, kind: ErrorKind, msg: String) {
        for r in &p.resvs {
            self.alloc.unreserve(r);
        }
        self.busy.remove(&p.key);
        out.answers.push((p.req, Answer::Failed(kind, msg)));
    }

    fn wired(
        &mut self,
        out: &mut Output,
        key: AttachmentKey,
        intent: u64,
        req: Option<ReqId>,
        outcome: Outcome,
    ) {
        self.busy.remove(&key);
        let Some(a) = self.alloc.attachment(&key).cloned() else {
            return;
        };
        match outcome {
            Outcome::Wired => {
                let done = Attachment {
                    state: AttachmentState::Wired,
                    ..a
                };
                out.rec_unsynced(Rec::PutAttachment(done.clone()));
                if intent != 0 {
                    self.intents.remove(&intent);
                    out.rec_unsynced(Rec::DeleteIntent(intent));
                }
                self.alloc.insert_attachment(done.clone());
                self.touch(&done.key);
                if let Some(req) = req {
                    out.answers.push((req, Answer::Added(addrs(&done))));
                }
            }
            Outcome::WireTimedOut => {
                // The kernel may be half way: keep the reservation and its
                // intent; a retried ADD or the next start wires it again.
                if let Some(req) = req {
                    out.answers.push((
                        req,
                        Answer::Failed(ErrorKind::TryAgain, format!("wiring {key} timed out")),
                    ));
                }
            }
            Outcome::WireFailed(kind, why)
                if req.is_none()
                    && a.state == AttachmentState::Wired
                    && !matches!(kind, ErrorKind::NetnsMissing | ErrorKind::BadEnv) =>
            {
                // The rebuild of a running pod's veth (deleted under it)
                // failed while its netns lives: the pod keeps its
                // addresses, and the next observation tries again.
                // Releasing it would take a running pod's network for good
                // (the simulator found this once runtimes retried ADDs).
                let _ = why;
                if intent != 0 {
                    self.intents.remove(&intent);
                    out.rec(Rec::DeleteIntent(intent));
                }
            }
            other => {
                // A refused wire may leave an earlier, complete wiring of
                // this attachment in place (the kernel adapter refuses a
                // pod interface name that is taken, and a re-wire finds
                // its own). The addresses are freed only after the veth is
                // removed: release the attachment as a DEL does.
                if intent != 0 {
                    self.intents.remove(&intent);
                    out.rec(Rec::DeleteIntent(intent));
                }
                self.begin_release(out, a);
                if let Some(req) = req {
                    let (kind, why) = match other {
                        Outcome::WireFailed(kind, why) => (kind, why),
                        o => (ErrorKind::Kernel, format!("{o:?}")),
                    };
                    out.answers
                        .push((req, Answer::Failed(kind, format!("wiring {key}: {why}"))));
                }
            }
        }
    }

    fn view(&mut self, out: &mut Output) {
        if !self
            .inflight
            .values()
            .any(|p| matches!(p, Pending::View { .. }))
        {
            let releases = self.releases;
            let full = !self.viewed_full
                || self
                    .intents
                    .values()
                    .any(|i| matches!(i.op, IntentOp::AcquireBlock { .. }));
            let fences = self.fences;
            let acq_seq = self.acq_seq;
            self.effect(
                out,
                Pending::View {
                    releases,
                    full,
                    fences,
                    acq_seq,
                },
                Effect::View { full },
            );
        }
    }

    fn viewed(
        &mut self,
        out: &mut Output,
        outcome: Outcome,
        full: bool,
        fences: u64,
        acq_seq: u64,
    ) {
        let Outcome::View { leases, fenced } = outcome else {
            return;
        };
        if fenced {
            self.fence(out);
            return;
        }
        if fences != self.fences {
            // Asked for before the fence was seen: stale.
            return;
        }
        // Re-admitted (`coilctl node readmit`): serve again, from new
        // blocks; the quarantined ones go once empty.
        self.removed = false;
        self.unconfirmed = false;
        self.viewed_full |= full;
        // Leases the store gave this node and the journal lacks (an
        // acquisition cut short by a crash or a timeout) are adopted.
        for (block, (pool, epoch)) in &leases {
            if self.alloc.blocks().any(|b| b.lease.block == *block) {
                continue;
            }
            let lease = BlockLease {
                pool: pool.clone(),
                block: *block,
                epoch: *epoch,
                state: LeaseState::Leased,
                alloc_cursor: 0,
            };
            out.rec(Rec::PutLease(lease.clone()));
            self.alloc.insert_lease(lease);
        }
        // Pending acquisitions with none in flight are settled by a full
        // view (a narrow one cannot show a lease this node lacks).
        if full {
            self.drop_settled_acquisitions(out, acq_seq);
        }
        // Leases the store no longer shows as this node's.
        let mine: Vec<BlockLease> = self
            .alloc
            .blocks()
            .filter(|b| b.lease.state == LeaseState::Leased)
            .map(|b| b.lease.clone())
            .collect();
        for l in mine {
            match leases.get(&l.block) {
                Some((_, e)) if *e == l.epoch => {}
                Some(_) => self.quarantine(out, &l),
                None => {
                    let busy = self
                        .inflight
                        .values()
                        .any(|p| matches!(p, Pending::Reacquire { block } if *block == l.block));
                    if !busy {
                        self.effect(
                            out,
                            Pending::Reacquire { block: l.block },
                            Effect::Reacquire { lease: l },
                        );
                    }
                }
            }
        }
    }

    fn reacquired(&mut self, out: &mut Output, block: IpNet, outcome: Outcome) {
        let Some(l) = self
            .alloc
            .blocks()
            .find(|b| b.lease.block == block)
            .map(|b| b.lease.clone())
        else {
            return;
        };
        match outcome {
            Outcome::Acquired(n) => {
                let lease = BlockLease {
                    epoch: n.epoch,
                    ..l
                };
                out.rec(Rec::PutLease(lease.clone()));
                self.alloc.insert_lease(lease);
            }
            Outcome::Taken { owner } => {
                self.lost_to.insert(block, owner);
                self.quarantine(out, &l)
            }
            Outcome::Fenced => self.fence(out),
            _ => {}
        }
    }

    fn quarantine(&mut self, out: &mut Output, l: &BlockLease) {
        let q = BlockLease {
            state: LeaseState::Quarantined,
            ..l.clone()
        };
        out.rec(Rec::PutLease(q.clone()));
        self.alloc.insert_lease(q);
    }

    /// The node's removal fence exists: every block is quarantined and no
    /// ADD is served.
    fn fence(&mut self, out: &mut Output) {
        self.removed = true;
        self.fences += 1;
        // A pending acquisition is spent: the removal freed every block
        // the node leased, and the fence refuses any lease after it.
        self.drop_settled_acquisitions(out, u64::MAX);
        let leased: Vec<BlockLease> = self
            .alloc
            .blocks()
            .filter(|b| b.lease.state != LeaseState::Quarantined)
            .map(|b| b.lease.clone())
            .collect();
        for l in leased {
            self.quarantine(out, &l);
        }
        for p in std::mem::take(&mut self.parked) {
            let msg = self.fenced_msg();
            self.give_up(out, p, ErrorKind::Fenced, msg);
        }
    }

    /// Empty blocks above the minimum, idle for two ticks, are released.
    fn release_idle(&mut self, out: &mut Output) {
        let mut count: BTreeMap<(String, Family), usize> = BTreeMap::new();
        for b in self.alloc.blocks() {
            if b.lease.state == LeaseState::Leased {
                *count
                    .entry((b.lease.pool.clone(), Family::of(&b.lease.block)))
                    .or_default() += 1;
            }
        }
        let empty: Vec<BlockLease> = self
            .alloc
            .blocks()
            .filter(|b| b.lease.state == LeaseState::Leased && b.used.is_empty())
            .map(|b| b.lease.clone())
            .collect();
        self.idle.retain(|n, _| empty.iter().any(|l| l.block == *n));
        for l in empty {
            let ticks = self.idle.entry(l.block).or_default();
            *ticks += 1;
            if *ticks < 2 {
                continue;
            }
            let k = (l.pool.clone(), Family::of(&l.block));
            let n = count.get(&k).copied().unwrap_or(0);
            if n <= self.cfg.min_blocks {
                continue;
            }
            count.insert(k, n - 1);
            let releasing = BlockLease {
                state: LeaseState::Releasing,
                ..l.clone()
            };
            let intent = self.new_intent(
                out,
                IntentOp::ReleaseBlock {
                    pool: l.pool.clone(),
                    block: l.block,
                },
            );
            out.rec(Rec::PutLease(releasing.clone()));
            self.alloc.insert_lease(releasing);
            self.start_release(out, l.block, intent);
        }
    }
}

fn addrs(a: &Attachment) -> Vec<IpAddr> {
    a.addresses.iter().map(|x| x.addr).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(boot: &str) -> MachineConfig {
        MachineConfig {
            node: "n1".into(),
            boot_id: boot.into(),
            min_blocks: 0,
            mtu: 1500,
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    fn lease(block: &str, epoch: u64) -> BlockLease {
        BlockLease {
            pool: "default".into(),
            block: net(block),
            epoch,
            state: LeaseState::Leased,
            alloc_cursor: 0,
        }
    }

    fn add(key: &AttachmentKey) -> Request {
        Request::Add {
            key: key.clone(),
            netns: "/run/netns/p".into(),
            pool: "default".into(),
            families: vec![Family::Ipv4],
            pod: PodMeta::default(),
        }
    }

    /// A started machine whose first view found nothing, and its journal.
    /// A started machine whose first view found nothing and whose table
    /// 119 was empty, and its journal.
    fn started() -> (NodeMachine, Durable) {
        let mut d = Durable::default();
        let (mut m, out) = NodeMachine::start(cfg("b1"), &d);
        let view = effect(&out, |e| matches!(e, Effect::View { .. }));
        let read = effect(&out, |e| *e == Effect::ReadTable);
        let scan = effect(&out, |e| *e == Effect::Scan);
        let empty = Outcome::Scanned {
            links: Vec::new(),
            routes: Vec::new(),
        };
        assert!(m.done(scan, empty).effects.is_empty());
        let out = m.done(view, no_leases());
        persist(&mut d, &out);
        let out = m.done(read, Outcome::Table(BTreeSet::new()));
        assert!(out.effects.is_empty());
        (m, d)
    }

    /// Completes every table 119 change in `out` (and those they lead
    /// to); returns the other effects.
    fn routed(m: &mut NodeMachine, out: Output) -> Vec<(EffectId, Effect)> {
        let mut rest = Vec::new();
        let mut todo = out.effects;
        while let Some((id, e)) = todo.pop() {
            match e {
                Effect::Export { .. } | Effect::Withdraw { .. } => {
                    todo.extend(m.done(id, Outcome::Routed).effects)
                }
                other => rest.push((id, other)),
            }
        }
        rest
    }

    fn persist(d: &mut Durable, out: &Output) {
        for r in &out.persist {
            d.apply(r);
        }
    }

    fn effect(out: &Output, f: impl Fn(&Effect) -> bool) -> EffectId {
        out.effects
            .iter()
            .find(|(_, e)| f(e))
            .map(|(id, _)| *id)
            .expect("effect")
    }

    #[test]
    fn add_persists_before_each_effect_and_answers_last() {
        let (mut m, mut d) = started();
        let key = AttachmentKey::new("net", "c1", "eth0");
        // No block: an AcquireBlock intent, durable before the Acquire.
        let out = m.request(1, add(&key));
        assert!(out.sync && out.answers.is_empty());
        assert!(
            matches!(&out.persist[..], [Rec::PutIntent(i)] if matches!(i.op, IntentOp::AcquireBlock { .. }))
        );
        let acq = effect(&out, |e| matches!(e, Effect::Acquire { .. }));
        persist(&mut d, &out);
        // The lease, the reservation and the Wire intent in one synced
        // batch, then the Wire; still no answer.
        let out = m.done(acq, Outcome::Acquired(lease("10.0.0.0/30", 7)));
        assert!(out.sync && out.answers.is_empty());
        assert!(out
            .persist
            .iter()
            .any(|r| matches!(r, Rec::PutAttachment(a) if a.state == AttachmentState::Reserved)));
        assert!(out
            .persist
            .iter()
            .any(|r| matches!(r, Rec::PutLease(l) if l.epoch == 7)));
        let wire = effect(&out, |e| matches!(e, Effect::Wire { .. }));
        persist(&mut d, &out);
        assert!(d
            .intents
            .values()
            .any(|i| matches!(i.op, IntentOp::Wire { .. })));
        // Wired: the mark may stay unsynced; the answer comes with it.
        let out = m.done(wire, Outcome::Wired);
        assert!(!out.sync);
        assert_eq!(
            out.answers,
            vec![(1, Answer::Added(vec!["10.0.0.0".parse().expect("ip")]))]
        );
        // A repeated ADD answers the same and changes nothing.
        let out = m.request(2, add(&key));
        assert!(out.persist.is_empty() && out.effects.is_empty());
        assert_eq!(
            out.answers,
            vec![(2, Answer::Added(vec!["10.0.0.0".parse().expect("ip")]))]
        );
    }

    #[test]
    fn a_restart_rolls_a_reserved_attachment_forward() {
        let (mut m, mut d) = started();
        let key = AttachmentKey::new("net", "c1", "eth0");
        let out = m.request(1, add(&key));
        let acq = effect(&out, |e| matches!(e, Effect::Acquire { .. }));
        persist(&mut d, &out);
        let out = m.done(acq, Outcome::Acquired(lease("10.0.0.0/30", 7)));
        persist(&mut d, &out);
        // Crash before the Wire's outcome: the journal holds Reserved and
        // its intent; the restart wires it again, with the same address.
        let (mut m2, out) = NodeMachine::start(cfg("b1"), &d);
        let wire = effect(
            &out,
            |e| matches!(e, Effect::Wire { spec, .. } if spec.addresses == vec!["10.0.0.0".parse::<IpAddr>().expect("ip")]),
        );
        persist(&mut d, &out);
        let out = m2.done(wire, Outcome::Wired);
        persist(&mut d, &out);
        assert!(d.intents.is_empty());
        assert_eq!(d.attachments[&key].state, AttachmentState::Wired);
        // After a reboot the attachment is released without an unwire
        // (its veth died with the boot) and ADD waits for the store.
        let (mut m3, out) = NodeMachine::start(cfg("b2"), &d);
        assert!(out.persist.contains(&Rec::DeleteAttachment(key.clone())));
        assert!(!out
            .effects
            .iter()
            .any(|(_, e)| matches!(e, Effect::Unwire { .. })));
        let out = m3.request(2, add(&AttachmentKey::new("net", "c2", "eth0")));
        assert!(matches!(
            &out.answers[..],
            [(2, Answer::Failed(ErrorKind::TryAgain, _))]
        ));
    }

    /// A pod whose veth is gone: rebuilt while its netns lives, released
    /// once the netns is gone, and never on an observation older than
    /// the attachment (deleted and added again under the same key).
    /// The first pod `key` of a started machine, wired in 10.0.0.0/30
    /// (epoch 7); every batch on the way is applied to `d`.
    fn first_pod_wired(m: &mut NodeMachine, d: &mut Durable, key: &AttachmentKey) -> Attachment {
        let out = m.request(1, add(key));
        persist(d, &out);
        let acq = effect(&out, |e| matches!(e, Effect::Acquire { .. }));
        let out = m.done(acq, Outcome::Acquired(lease("10.0.0.0/30", 7)));
        persist(d, &out);
        let wire = effect(&out, |e| matches!(e, Effect::Wire { .. }));
        let out = m.done(wire, Outcome::Wired);
        assert_eq!(out.answers.len(), 1, "{out:?}");
        persist(d, &out);
        m.state().attachment(key).cloned().expect("attachment")
    }

    /// A view of the store that shows these leases of this node (pool
    /// `default`), unfenced.
    fn leases_view(leases: &[(&str, u64)]) -> Outcome {
        Outcome::View {
            leases: leases
                .iter()
                .map(|(b, e)| (net(b), ("default".to_string(), *e)))
                .collect(),
            fenced: false,
        }
    }

    /// A view of the store that shows no lease of this node.
    fn no_leases() -> Outcome {
        leases_view(&[])
    }

    /// Ticks until the machine asks for a scan of the kernel.
    fn next_scan(m: &mut NodeMachine) -> EffectId {
        for _ in 0..SCAN_EVERY {
            let out = m.tick();
            if let Some((id, _)) = out.effects.iter().find(|(_, e)| *e == Effect::Scan) {
                return *id;
            }
        }
        panic!("no scan within {SCAN_EVERY} ticks");
    }

    #[test]
    fn a_scan_removes_what_no_attachment_owns_and_nothing_that_changed_since() {
        let (mut m, mut d) = started();
        let key = AttachmentKey::new("net", "c1", "eth0");
        let a = first_pod_wired(&mut m, &mut d, &key);
        let addr = a.addresses[0].addr;
        let orphan = AttachmentKey::new("net", "c9", "eth0");
        let orphan_veth = host_veth_name(&orphan);
        let listing = |extra_route: Option<IpNet>| {
            let mut routes = vec![(IpNet::from(addr), a.host_veth.clone(), 5)];
            routes.extend(extra_route.map(|r| (r, a.host_veth.clone(), 5)));
            Outcome::Scanned {
                links: vec![
                    (a.host_veth.clone(), Some(veth_alias(&a.key))),
                    (orphan_veth.clone(), Some(veth_alias(&orphan))),
                    // Not ours: another plugin's, or an operator's.
                    ("coilfoo".into(), None),
                    ("eth0".into(), Some("coil:eth0:x".into())),
                ],
                routes,
            }
        };
        let stray = net("10.0.0.3/32");
        // The orphan link and the stray route go; the pod's veth, its
        // route and foreign links stay.
        let scan = next_scan(&mut m);
        let out = m.done(scan, listing(Some(stray)));
        let mut fx: Vec<Effect> = out.effects.into_iter().map(|(_, e)| e).collect();
        fx.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(
            fx,
            vec![
                Effect::RemoveHostRoute {
                    dst: stray,
                    dev: a.host_veth.clone(),
                    oif: 5
                },
                Effect::RemoveLink {
                    name: orphan_veth.clone()
                },
            ]
        );
        // While the orphan's link is being removed, an ADD of its key
        // waits: it would make a link of that very name.
        let out = m.request(2, add(&orphan));
        assert!(
            matches!(
                &out.answers[..],
                [(2, Answer::Failed(ErrorKind::TryAgain, _))]
            ),
            "{out:?}"
        );
        // A scan listed before the orphan's key was added and wired (its
        // link is a new pod's now, then deleted again) acts on neither.
        let removals: Vec<EffectId> = m
            .inflight
            .iter()
            .filter(|(_, p)| matches!(p, Pending::Remove { .. }))
            .map(|(id, _)| *id)
            .collect();
        for id in removals {
            m.done(id, Outcome::Removed);
        }
        let scan = next_scan(&mut m);
        let out = m.request(3, add(&orphan));
        let wire = effect(&out, |e| matches!(e, Effect::Wire { .. }));
        m.done(wire, Outcome::Wired);
        let out = m.request(
            4,
            Request::Del {
                key: orphan.clone(),
            },
        );
        let unwire = effect(&out, |e| matches!(e, Effect::Unwire { .. }));
        m.done(unwire, Outcome::Unwired);
        // The pod's attachment changed too (a DEL and a re-ADD would do):
        // its stray route is not judged on an older listing either.
        m.touch(&key);
        let out = m.done(scan, listing(Some(stray)));
        assert!(out.effects.is_empty(), "{out:?}");
        // A fresh scan sees the orphan's link (say, its teardown failed)
        // and removes it.
        let scan = next_scan(&mut m);
        let out = m.done(scan, listing(None));
        assert_eq!(
            out.effects.into_iter().map(|(_, e)| e).collect::<Vec<_>>(),
            vec![Effect::RemoveLink { name: orphan_veth }]
        );
    }

    #[test]
    fn a_view_read_before_an_ambiguous_acquisition_does_not_settle_it() {
        let (mut m, mut d) = started();
        let key = AttachmentKey::new("net", "c1", "eth0");
        let out = m.request(1, add(&key));
        persist(&mut d, &out);
        let acq = effect(&out, |e| matches!(e, Effect::Acquire { .. }));
        // A full view asked for while the acquisition is in flight: it
        // may read the store before the acquisition's write lands.
        let out = m.tick();
        let view = effect(&out, |e| *e == Effect::View { full: true });
        // The store leased 10.0.0.0/30 but its answer was lost.
        let out = m.done(acq, Outcome::Unavailable);
        persist(&mut d, &out);
        let out = m.done(view, no_leases());
        persist(&mut d, &out);
        assert_eq!(
            d.intents.len(),
            1,
            "the older view must not settle the acquisition: {out:?}"
        );
        // The next full view shows the lease: adopted, and the intent
        // settled.
        let out = m.tick();
        persist(&mut d, &out);
        let view = effect(&out, |e| *e == Effect::View { full: true });
        let out = m.done(view, leases_view(&[("10.0.0.0/30", 7)]));
        persist(&mut d, &out);
        assert!(d.intents.is_empty(), "{:?}", d.intents);
        assert!(d.leases.contains_key(&net("10.0.0.0/30")));
    }

    #[test]
    fn a_block_another_node_took_is_quarantined_naming_the_owner() {
        let (mut m, mut d) = started();
        let key = AttachmentKey::new("net", "c1", "eth0");
        first_pod_wired(&mut m, &mut d, &key);
        let block = net("10.0.0.0/30");
        // The store no longer shows the lease: it is taken again, but
        // another node holds the block now.
        let out = m.tick();
        let view = effect(&out, |e| matches!(e, Effect::View { .. }));
        let out = m.done(view, no_leases());
        let re = effect(&out, |e| matches!(e, Effect::Reacquire { .. }));
        let out = m.done(re, Outcome::Taken { owner: "n2".into() });
        persist(&mut d, &out);
        assert_eq!(d.leases[&block].state, LeaseState::Quarantined);
        assert_eq!(m.lost_to(&block), Some("n2"));
        // No new address comes from it.
        let other = AttachmentKey::new("net", "c2", "eth0");
        let out = m.request(2, add(&other));
        assert!(
            out.effects
                .iter()
                .any(|(_, e)| matches!(e, Effect::Acquire { .. })),
            "{out:?}"
        );
    }

    #[test]
    fn observed_drift_rebuilds_or_releases_only_what_did_not_change() {
        let (mut m, mut d) = started();
        let key = AttachmentKey::new("net", "c1", "eth0");
        first_pod_wired(&mut m, &mut d, &key);
        let observe = |m: &mut NodeMachine| {
            let out = m.tick();
            effect(&out, |e| matches!(e, Effect::Observe { .. }))
        };
        // The veth is gone, the netns lives: a create-or-verify wire.
        let o = observe(&mut m);
        let out = m.done(o, Outcome::Observed(vec![(key.clone(), true)]));
        let wire = effect(
            &out,
            |e| matches!(e, Effect::Wire { fresh: false, key: k, .. } if *k == key),
        );
        m.done(wire, Outcome::Wired);
        // An observation asked for before a DEL and a new ADD of the same
        // key says the (old) netns is gone: the new pod is left alone.
        let o = observe(&mut m);
        let out = m.request(2, Request::Del { key: key.clone() });
        let unwire = effect(&out, |e| matches!(e, Effect::Unwire { .. }));
        m.done(unwire, Outcome::Unwired);
        let out = m.request(3, add(&key));
        let wire = effect(&out, |e| matches!(e, Effect::Wire { .. }));
        m.done(wire, Outcome::Wired);
        let out = m.done(o, Outcome::Observed(vec![(key.clone(), false)]));
        assert!(out.effects.is_empty(), "{out:?}");
        assert_eq!(
            m.state().attachment(&key).map(|a| a.state),
            Some(AttachmentState::Wired)
        );
        // A fresh observation of a gone netns releases it.
        let o = observe(&mut m);
        let out = m.done(o, Outcome::Observed(vec![(key.clone(), false)]));
        effect(&out, |e| matches!(e, Effect::Unwire { .. }));
        assert_eq!(
            m.state().attachment(&key).map(|a| a.state),
            Some(AttachmentState::Releasing)
        );
    }

    #[test]
    fn a_failed_rebuild_of_a_running_pod_keeps_it_and_tries_again() {
        let (mut m, mut d) = started();
        let key = AttachmentKey::new("net", "c1", "eth0");
        first_pod_wired(&mut m, &mut d, &key);
        let rebuild = |m: &mut NodeMachine, d: &mut Durable| {
            let out = m.tick();
            let o = effect(&out, |e| matches!(e, Effect::Observe { .. }));
            let out = m.done(o, Outcome::Observed(vec![(key.clone(), true)]));
            persist(d, &out);
            effect(&out, |e| matches!(e, Effect::Wire { fresh: false, .. }))
        };
        // The kernel refuses the rebuild: the pod keeps its attachment.
        let wire = rebuild(&mut m, &mut d);
        let out = m.done(
            wire,
            Outcome::WireFailed(ErrorKind::Kernel, "refused".into()),
        );
        persist(&mut d, &out);
        assert!(out.effects.is_empty(), "{out:?}");
        assert_eq!(d.attachments[&key].state, AttachmentState::Wired);
        assert!(d.intents.is_empty(), "{:?}", d.intents);
        // The next observation tries again; a gone netns releases it.
        let wire = rebuild(&mut m, &mut d);
        let out = m.done(
            wire,
            Outcome::WireFailed(ErrorKind::NetnsMissing, "gone".into()),
        );
        effect(&out, |e| matches!(e, Effect::Unwire { .. }));
    }

    #[test]
    fn a_failed_wire_frees_its_addresses_only_after_an_unwire() {
        let (mut m, _) = started();
        let key = AttachmentKey::new("net", "c1", "eth0");
        let out = m.request(1, add(&key));
        let acq = effect(&out, |e| matches!(e, Effect::Acquire { .. }));
        let out = m.done(acq, Outcome::Acquired(lease("10.0.0.0/30", 7)));
        let wire = effect(&out, |e| matches!(e, Effect::Wire { .. }));
        let out = m.done(
            wire,
            Outcome::WireFailed(ErrorKind::Kernel, "refused".into()),
        );
        assert!(matches!(
            &out.answers[..],
            [(1, Answer::Failed(ErrorKind::Kernel, _))]
        ));
        let unwire = effect(&out, |e| matches!(e, Effect::Unwire { .. }));
        // Until the Unwire is done, the address is not given again.
        let k2 = AttachmentKey::new("net", "c2", "eth0");
        let out = m.request(2, add(&k2));
        let w2 = out
            .effects
            .iter()
            .find_map(|(_, e)| match e {
                Effect::Wire { spec, .. } => Some(spec.addresses.clone()),
                _ => None,
            })
            .expect("second pod wired");
        assert_ne!(w2, vec!["10.0.0.0".parse::<IpAddr>().expect("ip")]);
        let out = m.done(unwire, Outcome::Unwired);
        assert!(out.persist.contains(&Rec::DeleteAttachment(key)));
    }

    #[test]
    fn an_acquire_answer_older_than_a_release_is_not_trusted() {
        let (mut m, _) = started();
        let key = AttachmentKey::new("net", "c1", "eth0");
        // The Acquire runs in the store (block A, epoch 3), its answer is
        // late; a view adopts A, it idles and is released.
        let out = m.request(1, add(&key));
        let acq = effect(&out, |e| matches!(e, Effect::Acquire { .. }));
        let out = m.tick();
        let view = effect(&out, |e| matches!(e, Effect::View { .. }));
        let out = m.done(view, leases_view(&[("10.0.0.0/30", 3)]));
        // The adopted block is published in table 119.
        assert!(out.effects.iter().any(|(_, e)| *e
            == Effect::Export {
                block: net("10.0.0.0/30")
            }));
        let _ = routed(&mut m, out);
        // The parked ADD is still waiting for its own Acquire; the block
        // is used by nobody: two ticks release it, after its withdrawal.
        let mut release = None;
        for _ in 0..3 {
            let out = m.tick();
            assert!(
                !out.effects
                    .iter()
                    .any(|(_, e)| matches!(e, Effect::Release { .. })),
                "released before the withdrawal"
            );
            if let Some((id, _)) = routed(&mut m, out)
                .iter()
                .find(|(_, e)| matches!(e, Effect::Release { .. }))
            {
                release = Some(*id);
            }
        }
        let r = release.expect("the adopted, unused block is released");
        let _ = m.done(r, Outcome::Released);
        // The late answer names the released incarnation: ignored, and the
        // waiting ADD is told to retry.
        let out = m.done(acq, Outcome::Acquired(lease("10.0.0.0/30", 3)));
        assert!(!m
            .state()
            .blocks()
            .any(|b| b.lease.block == net("10.0.0.0/30")));
        assert!(matches!(
            &out.answers[..],
            [(1, Answer::Failed(ErrorKind::TryAgain, _))]
        ));
    }

    #[test]
    fn gc_releases_only_its_own_network() {
        let (mut m, _) = started();
        let ours = AttachmentKey::new("net", "c1", "eth0");
        let theirs = AttachmentKey::new("other", "c1", "eth1");
        let out = m.request(1, add(&ours));
        let acq = effect(&out, |e| matches!(e, Effect::Acquire { .. }));
        let out = m.done(acq, Outcome::Acquired(lease("10.0.0.0/29", 7)));
        let w1 = effect(&out, |e| matches!(e, Effect::Wire { .. }));
        let _ = m.done(w1, Outcome::Wired);
        let out = m.request(2, add(&theirs));
        let w2 = effect(&out, |e| matches!(e, Effect::Wire { .. }));
        let _ = m.done(w2, Outcome::Wired);
        // The other network's GC lists none of ours: ours stays.
        let out = m.request(
            3,
            Request::Gc {
                network: "other".into(),
                keep: BTreeSet::new(),
            },
        );
        let unwired: Vec<&AttachmentKey> = out
            .effects
            .iter()
            .filter_map(|(_, e)| match e {
                Effect::Unwire { key, .. } => Some(key),
                _ => None,
            })
            .collect();
        assert_eq!(unwired, vec![&theirs]);
        assert_eq!(
            m.state().attachment(&ours).map(|a| a.state),
            Some(AttachmentState::Wired)
        );
    }

    #[test]
    fn a_fenced_node_quarantines_its_blocks_and_serves_no_add() {
        let (mut m, _) = started();
        let out = m.request(1, add(&AttachmentKey::new("net", "c1", "eth0")));
        let acq = effect(&out, |e| matches!(e, Effect::Acquire { .. }));
        let _ = m.done(acq, Outcome::Acquired(lease("10.0.0.0/30", 7)));
        let out = m.tick();
        let view = effect(&out, |e| matches!(e, Effect::View { .. }));
        let out = m.done(
            view,
            Outcome::View {
                leases: BTreeMap::new(),
                fenced: true,
            },
        );
        assert!(m.removed());
        assert!(out
            .persist
            .iter()
            .any(|r| matches!(r, Rec::PutLease(l) if l.state == LeaseState::Quarantined)));
        let out = m.request(2, add(&AttachmentKey::new("net", "c2", "eth0")));
        assert!(matches!(
            &out.answers[..],
            [(2, Answer::Failed(ErrorKind::Fenced, _))]
        ));
    }
}
