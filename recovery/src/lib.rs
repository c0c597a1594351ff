//! coil-recovery: brings a node's journal, the cluster store and the kernel
//! back into agreement after a crash, an outage or a reboot.
//!
//! observe -> diff/plan (pure, [`plan`]) -> apply. Every applied step is
//! journaled (intent first) and idempotent, so an interrupted apply
//! converges when it runs again.

pub mod plan;
pub mod rebuild;

use std::collections::BTreeSet;
use std::sync::Arc;

use coil::journal::{
    Attachment, AttachmentKey, AttachmentState, Batch, BlockLease, Intent, IntentOp, IntentState,
    Journal, JournalError, LeaseState,
};
use coil::kernel::{KernelError, KernelOps};
use coil::node::wire_spec;
use coil::store::{Backend, Store, StoreError};
use ipnet::IpNet;
use serde::Serialize;

pub use plan::{plan, Action, HostLink, KernelView, Observation, StoreLease};

/// Why observing or applying failed.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("journal: {0}")]
    Journal(#[from] JournalError),
    #[error("kernel: {0}")]
    Kernel(#[from] KernelError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Other(String),
}

type Result<T, E = RecoveryError> = std::result::Result<T, E>;

/// What recovery works on. The journal is shared with coild.
#[derive(Debug)]
pub struct Context<'a, B: Backend, K: KernelOps> {
    pub journal: &'a Arc<Journal>,
    pub store: &'a Store<B>,
    pub kernel: &'a K,
    pub node: &'a str,
    pub boot_id: &'a str,
    pub mtu: u32,
    /// List every link to find orphans (slow with thousands of pods: the
    /// kernel pays per veth). Without it, links are learnt from coil's host
    /// routes, which is all the attachment checks need; orphans wait for a
    /// full pass.
    pub full_scan: bool,
    /// List every block in the store, to find leases of this node that its
    /// journal lacks. Needed at a start, by `node repair`, and whenever an
    /// acquisition intent is pending (the only way such a lease arises);
    /// without it (a periodic resync) the store is asked only about the
    /// journal's blocks and the node's removal fence, at a cost that does
    /// not grow with the cluster.
    pub store_scan: bool,
    /// Publish nothing in the routing table while the store has not
    /// confirmed the node's leases since it booted (see
    /// `Observation::hold_exports`).
    pub hold_exports: bool,
}

/// Reads journal, store (None if unreachable) and kernel.
pub async fn observe<B: Backend, K: KernelOps>(cx: &Context<'_, B, K>) -> Result<Observation> {
    let t = std::time::Instant::now();
    let mut marks: Vec<(&str, u128)> = Vec::new();
    let j = cx.journal;
    let leases = j.leases()?;
    let attachments = j.attachments()?;
    let intents = j.intents()?;
    let journal_boot_id = j.node_meta()?.map(|m| m.boot_id);
    marks.push(("journal", t.elapsed().as_micros()));
    let blocks: BTreeSet<IpNet> = leases.iter().map(|l| l.block).collect();
    // Bad store entries (values that fail validation against their key and
    // pool) are skipped, counted and logged by the store, never returned:
    // one must not stop recovery, and none may reach table 119. A block of
    // ours whose key holds one looks lost, and re-acquiring it fails with
    // `Corrupt` naming the key (that step is reported, the rest goes on).
    let to_store = |l: coil::store::BlockLease| StoreLease {
        pool: l.pool,
        block: l.block,
        node: l.node,
        epoch: l.epoch,
        acquired_unix: l.acquired_unix,
    };
    let acquiring = intents
        .iter()
        .any(|i| i.state == IntentState::Pending && matches!(i.op, IntentOp::AcquireBlock { .. }));
    // The cheap view first (the journal's blocks and the fence, one read);
    // every block only when this node may hold a lease its journal lacks.
    let view = if cx.store_scan || acquiring {
        Ok(None)
    } else {
        let mine: Vec<(String, IpNet)> = leases.iter().map(|l| (l.pool.clone(), l.block)).collect();
        cx.store.node_view(cx.node, &mine).await
    };
    let (store, removed) = match view {
        Ok(Some(v)) => (
            Some(v.leases.into_iter().map(to_store).collect::<Vec<_>>()),
            v.removed,
        ),
        Err(e) if e.is_unavailable() => (None, false),
        Err(e) => return Err(e.into()),
        Ok(None) => {
            let mut store = match cx.store.all_blocks().await {
                Ok(all) => Some(
                    all.into_iter()
                        .filter(|l| l.node == cx.node || blocks.contains(&l.block))
                        .map(to_store)
                        .collect::<Vec<_>>(),
                ),
                Err(e) if e.is_unavailable() => None,
                Err(e) => return Err(e.into()),
            };
            // A removal fence of this node (a malformed fence counts as
            // one: it is in the way of re-admission). If it cannot be
            // read, the store counts as unreachable for this plan: nothing
            // is re-acquired, adopted or released on a store view whose
            // fence is unknown.
            let removed = match cx.store.removal(cx.node).await {
                Ok(r) => r.is_some(),
                Err(e) if e.is_corrupt() => true,
                Err(_) => {
                    store = None;
                    false
                }
            };
            (store, removed)
        }
    };
    marks.push(("store", t.elapsed().as_micros()));
    let routes = cx.kernel.host_routes().await?;
    let links: Vec<(u32, String, Option<String>)> = if cx.full_scan {
        cx.kernel.links().await?
    } else {
        let mut idx: Vec<u32> = routes.iter().map(|(_, i)| *i).collect();
        idx.sort_unstable();
        idx.dedup();
        cx.kernel
            .names_of(&idx)
            .await?
            .into_iter()
            .map(|(i, n)| (i, n, None))
            .collect()
    };
    marks.push(("links", t.elapsed().as_micros()));
    let names: std::collections::HashMap<u32, &str> =
        links.iter().map(|l| (l.0, l.1.as_str())).collect();
    let name_of = |idx: u32| names.get(&idx).map(|n| n.to_string()).unwrap_or_default();
    let host_routes = routes.into_iter().map(|(d, i)| (d, name_of(i))).collect();
    marks.push(("routes", t.elapsed().as_micros()));
    let kernel = KernelView {
        links: links
            .iter()
            .filter(|l| l.1.starts_with("coil"))
            .map(|l| HostLink {
                name: l.1.clone(),
                alias: l.2.clone(),
            })
            .collect(),
        host_routes,
        exported: cx.kernel.exported_blocks().await?,
    };
    marks.push(("exported", t.elapsed().as_micros()));
    let paths: BTreeSet<String> = attachments
        .iter()
        .map(|a| a.netns.clone())
        .filter(|p| !p.is_empty())
        .collect();
    // Only a pod's own network namespace counts: a path that is gone, is
    // not a netns, or is coild's or the host's is treated as gone.
    let live_netns = cx.kernel.live_netns(paths.into_iter().collect()).await;
    marks.push(("netns", t.elapsed().as_micros()));
    tracing::debug!(?marks, "observed (cumulative µs)");
    Ok(Observation {
        node: cx.node.to_string(),
        boot_id: cx.boot_id.to_string(),
        journal_boot_id,
        leases,
        attachments,
        intents,
        store,
        kernel,
        live_netns,
        removed,
        hold_exports: cx.hold_exports,
    })
}

/// The outcome of one applied step.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub action: Action,
    pub ok: bool,
    pub error: Option<String>,
}

fn commit(j: &Journal, b: Batch) -> Result<()> {
    if !b.is_empty() {
        j.commit(b)?;
    }
    Ok(())
}

fn new_intent(j: &Journal, op: IntentOp) -> Intent {
    Intent {
        id: j.next_intent_id(),
        op,
        state: IntentState::Pending,
        created_unix: coil::journal::now_unix(),
    }
}

/// Releases an attachment: Releasing + intent durable, kernel state
/// removed, then its records. Idempotent.
pub async fn release_attachment<B: Backend, K: KernelOps>(
    cx: &Context<'_, B, K>,
    key: &AttachmentKey,
) -> Result<()> {
    let j = cx.journal;
    let Some(a) = j.attachment(key)? else {
        return Ok(());
    };
    let intent = new_intent(j, IntentOp::Unwire { key: key.clone() });
    let mut b = Batch::new();
    b.put_intent(&intent).put_attachment(&Attachment {
        state: AttachmentState::Releasing,
        ..a.clone()
    });
    commit(j, b)?;
    cx.kernel.unwire(&a.host_veth).await?;
    let mut b = Batch::new();
    b.delete_attachment(key).delete_intent(intent.id);
    for x in &a.addresses {
        b.delete_address(x.addr);
    }
    commit(j, b)
}

async fn apply_one<B: Backend, K: KernelOps>(cx: &Context<'_, B, K>, a: &Action) -> Result<()> {
    let j = cx.journal;
    match a {
        Action::AdoptLease { lease } => {
            let mut b = Batch::new();
            b.put_lease(&BlockLease {
                pool: lease.pool.clone(),
                block: lease.block,
                epoch: u64::try_from(lease.epoch).unwrap_or(0),
                state: LeaseState::Leased,
                alloc_cursor: 0,
            });
            commit(j, b)
        }
        Action::ReacquireLease { pool, block } => {
            let intent = new_intent(
                j,
                IntentOp::AcquireBlock {
                    pool: pool.clone(),
                    block: Some(*block),
                },
            );
            let mut b = Batch::new();
            b.put_intent(&intent);
            commit(j, b)?;
            let got = cx.store.acquire_specific(pool, *block, cx.node).await;
            let mut b = Batch::new();
            b.delete_intent(intent.id);
            let cur = j.lease(*block)?;
            match got {
                Ok(l) => {
                    if let Some(mut jl) = cur {
                        jl.epoch = u64::try_from(l.epoch).unwrap_or(0);
                        jl.state = LeaseState::Leased;
                        b.put_lease(&jl);
                    }
                    commit(j, b)
                }
                // Taken by another node, or this node was removed since the
                // plan was made: never serve the block again.
                Err(StoreError::NotOwner { .. } | StoreError::NodeRemoved { .. }) => {
                    if let Some(mut jl) = cur {
                        jl.state = LeaseState::Quarantined;
                        b.put_lease(&jl);
                    }
                    commit(j, b)?;
                    cx.kernel.withdraw_block(*block).await?;
                    Ok(())
                }
                Err(e) => {
                    commit(j, b)?;
                    Err(e.into())
                }
            }
        }
        Action::QuarantineLease { block, .. } => {
            if let Some(mut l) = j.lease(*block)? {
                l.state = LeaseState::Quarantined;
                let mut b = Batch::new();
                b.put_lease(&l);
                commit(j, b)?;
            }
            Ok(())
        }
        Action::Rewire { key } => {
            let Some(att) = j.attachment(key)? else {
                return Ok(());
            };
            let spec = wire_spec(&att, cx.mtu);
            // An ADD that wired the pod and answered, but whose Wired record
            // did not reach the disk (it is committed without waiting for
            // its sync), leaves a complete wiring: adopt it, and leave the
            // running pod's interface alone.
            if matches!(cx.kernel.check(&spec).await, Ok(d) if d.is_empty()) {
                let mut b = Batch::new();
                b.put_attachment(&Attachment {
                    state: AttachmentState::Wired,
                    ..att
                });
                return commit(j, b);
            }
            let intent = new_intent(j, IntentOp::Wire { key: key.clone() });
            let mut b = Batch::new();
            b.put_intent(&intent);
            commit(j, b)?;
            // Whatever is left of the old wiring goes first (its pod end
            // would hold the interface name).
            cx.kernel.unwire(&att.host_veth).await?;
            cx.kernel.wire(&spec).await?;
            let mut b = Batch::new();
            b.put_attachment(&Attachment {
                state: AttachmentState::Wired,
                ..att
            })
            .delete_intent(intent.id);
            commit(j, b)
        }
        Action::ExportBlock { block } => Ok(cx.kernel.export_block(*block).await?),
        Action::WithdrawBlock { block } => Ok(cx.kernel.withdraw_block(*block).await?),
        Action::ReleaseAttachment { key, .. } => release_attachment(cx, key).await,
        Action::RemoveLink { name } => {
            cx.kernel.unwire(name).await?;
            Ok(())
        }
        Action::RemoveHostRoute { dst, dev } => {
            let links = cx.kernel.links().await?;
            if let Some((idx, _, _)) = links.iter().find(|l| &l.1 == dev) {
                cx.kernel.del_host_route(*dst, *idx).await?;
            }
            Ok(())
        }
        Action::ReleaseStoreLease { lease } => {
            let intent = new_intent(
                j,
                IntentOp::ReleaseBlock {
                    pool: lease.pool.clone(),
                    block: lease.block,
                },
            );
            let mut b = Batch::new();
            b.put_intent(&intent);
            commit(j, b)?;
            let r = cx
                .store
                .release_block(&coil::store::BlockLease {
                    pool: lease.pool.clone(),
                    block: lease.block,
                    node: lease.node.clone(),
                    acquired_unix: lease.acquired_unix,
                    epoch: lease.epoch,
                })
                .await;
            let mut b = Batch::new();
            b.delete_intent(intent.id);
            match r {
                Ok(()) | Err(StoreError::NotLeased { .. }) => commit(j, b),
                Err(e) => {
                    commit(j, b)?;
                    Err(e.into())
                }
            }
        }
        Action::ForgetLease { block } => {
            let mut b = Batch::new();
            b.delete_lease(*block);
            commit(j, b)
        }
        Action::DropIntent { id, .. } => {
            let mut b = Batch::new();
            b.delete_intent(*id);
            commit(j, b)
        }
    }
}

/// Longest one recovery step may take (a step is a few netlink or store
/// calls; the bound keeps a stuck kernel or store from holding every
/// request off, since recovery runs under coild's exclusive gate).
pub const STEP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

/// Applies a plan in order, continuing past failures (each is reported).
pub async fn apply<B: Backend, K: KernelOps>(
    cx: &Context<'_, B, K>,
    plan: &[Action],
) -> Vec<Outcome> {
    let mut out = Vec::with_capacity(plan.len());
    for a in plan {
        coil::failpoint::hit("recovery.step");
        let r = match tokio::time::timeout(STEP_DEADLINE, apply_one(cx, a)).await {
            Ok(r) => r,
            Err(_) => Err(RecoveryError::Other(format!(
                "did not finish within {STEP_DEADLINE:?}; retried at the next resync"
            ))),
        };
        if r.is_ok() {
            coil::failpoint::hit("recovery.applied");
        }
        if let Err(e) = &r {
            tracing::warn!(action = %a, "recovery step failed: {e}");
        } else {
            tracing::info!(action = %a, "recovery");
        }
        out.push(Outcome {
            action: a.clone(),
            ok: r.is_ok(),
            error: r.err().map(|e| e.to_string()),
        });
    }
    out
}

/// observe -> plan -> apply, once.
pub async fn recover<B: Backend, K: KernelOps>(
    cx: &Context<'_, B, K>,
    dry_run: bool,
) -> Result<(Observation, Vec<Outcome>)> {
    let o = observe(cx).await?;
    let p = plan(&o);
    if dry_run {
        let out = p
            .into_iter()
            .map(|a| Outcome {
                action: a,
                ok: true,
                error: None,
            })
            .collect();
        return Ok((o, out));
    }
    let out = apply(cx, &p).await;
    Ok((o, out))
}
