//! Rebuilding a lost or corrupt journal from the store and the kernel
//! (`coilctl node repair --rebuild`, coild stopped).
//!
//! The kernel remembers the attachments: every host veth coil creates is
//! named after its (container id, ifname) and carries the alias
//! `coil:<ifname>:<container id>`, and its pod addresses are the host
//! routes (coil's protocol id) through it. The store remembers the node's
//! block leases. The damaged journal is moved aside, never deleted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use coil::journal::{
    AddressEntry, AssignedAddress, Attachment, AttachmentState, Batch, BlockLease, Journal,
    LeaseState, NodeMeta,
};
use coil::kernel::KernelOps;
use coil::node::{host_veth_name, parse_alias};
use coil::store::{Backend, Store};
use serde::Serialize;

use crate::RecoveryError;

/// What a rebuild recovered.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RebuildReport {
    /// Where the damaged journal was moved (None if there was none).
    pub moved_to: Option<PathBuf>,
    pub leases: usize,
    pub attachments: usize,
    pub addresses: usize,
    /// Links that looked like coil's but could not be attributed.
    pub skipped: Vec<String>,
}

/// Moves `dir` aside (if present) and writes a new journal from what the
/// store and the kernel hold.
pub async fn rebuild<B: Backend, K: KernelOps>(
    dir: &Path,
    store: &Store<B>,
    kernel: &K,
    node: &str,
    boot_id: &str,
) -> Result<RebuildReport, RecoveryError> {
    // The store must answer: without it the leases cannot be rebuilt.
    let leases: Vec<coil::store::BlockLease> = store.node_blocks(node).await?;
    let mut report = RebuildReport::default();
    if dir.exists() {
        // A fresh name every time: two rebuilds in one second must not
        // collide (the chaos tests did that), and nothing is overwritten.
        let stamp = coil::journal::now_unix();
        let aside = (0u32..)
            .map(|n| dir.with_extension(format!("broken-{stamp}-{n}")))
            .find(|p| !p.exists())
            .unwrap_or_else(|| dir.with_extension(format!("broken-{stamp}")));
        std::fs::rename(dir, &aside).map_err(|e| {
            RecoveryError::Other(format!(
                "moving {} aside to {}: {e}",
                dir.display(),
                aside.display()
            ))
        })?;
        report.moved_to = Some(aside);
    }
    let j = Journal::open(dir)?;
    let mut b = Batch::new();
    b.put_node_meta(&NodeMeta {
        node_name: node.to_string(),
        boot_id: boot_id.to_string(),
        cluster_id: String::new(),
        created_unix: coil::journal::now_unix(),
    });
    for l in &leases {
        b.put_lease(&BlockLease {
            pool: l.pool.clone(),
            block: l.block,
            epoch: u64::try_from(l.epoch).unwrap_or(0),
            state: LeaseState::Leased,
            alloc_cursor: 0,
        });
    }
    report.leases = leases.len();
    let links = kernel.links().await?;
    let routes = kernel.host_routes().await?;
    let mut by_link: BTreeMap<u32, Vec<std::net::IpAddr>> = BTreeMap::new();
    for (dst, oif) in routes {
        by_link.entry(oif).or_default().push(dst.addr());
    }
    for (idx, name, alias) in links {
        if !name.starts_with("coil") {
            continue;
        }
        let Some(key) = alias.as_deref().and_then(parse_alias) else {
            report.skipped.push(format!("{name}: no coil alias"));
            continue;
        };
        if host_veth_name(&key) != name {
            report.skipped.push(format!(
                "{name}: alias names {key}, whose veth has another name"
            ));
            continue;
        }
        let mut addresses = Vec::new();
        for a in by_link.get(&idx).cloned().unwrap_or_default() {
            match leases.iter().find(|l| l.block.contains(&a)) {
                Some(l) => addresses.push((
                    AssignedAddress {
                        addr: a,
                        block: l.block,
                    },
                    l.pool.clone(),
                )),
                None => report.skipped.push(format!(
                    "{name}: address {a} is in no block this node leases"
                )),
            }
        }
        if addresses.is_empty() {
            report.skipped.push(format!("{name}: no address"));
            continue;
        }
        let pool = addresses[0].1.clone();
        let att = Attachment {
            key: key.clone(),
            // The kernel does not say which netns path the peer lives in;
            // DEL does not need it, CHECK reports it.
            netns: String::new(),
            pod_namespace: String::new(),
            pod_name: String::new(),
            pool,
            addresses: addresses.iter().map(|(a, _)| *a).collect(),
            host_veth: name.clone(),
            state: AttachmentState::Wired,
            boot_id: boot_id.to_string(),
            created_unix: coil::journal::now_unix(),
        };
        for (a, _) in &addresses {
            b.put_address(
                a.addr,
                &AddressEntry {
                    attachment: key.clone(),
                    block: a.block,
                },
            );
            report.addresses += 1;
        }
        b.put_attachment(&att);
        report.attachments += 1;
    }
    j.commit(b)?;
    j.close()?;
    Ok(report)
}
