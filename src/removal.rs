//! Who may free a node's blocks: the controller's decision, pure, so the
//! controller binary and the cluster simulator (coil-sim) run the same
//! rule. A node's blocks are freed only on proof that its pods are gone:
//! its Kubernetes Node object was deleted (or an operator ran `coilctl node
//! remove`). Losing liveness, however long ago, frees nothing: a node cut
//! off from the store keeps serving its pods from its blocks
//! (docs/ARCHITECTURE.md, "Who may free a block").

use std::collections::BTreeSet;

use crate::store::NodeStatus;

/// The sanity guard on a complete Node list, pure for tests: `Err` says why
/// the list must not be acted on this pass. A list is suspect when it is
/// empty while the store shows live nodes (an API server that lost its
/// data, or an answer for the wrong cluster), or when the dead nodes it
/// calls deleted are more than `max_fraction` of the nodes holding blocks.
pub fn judge_node_list(
    nodes: &[NodeStatus],
    existing: &BTreeSet<String>,
    max_fraction: f64,
) -> Result<(), String> {
    let alive = nodes.iter().filter(|n| n.alive).count();
    if existing.is_empty() && alive > 0 {
        return Err(format!(
            "the Kubernetes API lists no Node at all while {alive} node(s) are alive in the store"
        ));
    }
    let holding = nodes.iter().filter(|n| n.blocks > 0).count();
    let deleted = nodes
        .iter()
        .filter(|n| !n.alive && n.blocks > 0 && !existing.contains(&n.node))
        .count();
    if deleted > 0 && deleted as f64 > max_fraction * holding as f64 {
        return Err(format!(
            "the Kubernetes API lacks {deleted} of the {holding} node(s) holding blocks, \
             more than the {max_fraction} allowed at once"
        ));
    }
    Ok(())
}

/// The nodes to remove this pass: pure, for tests. Only a node the
/// Kubernetes API no longer lists (`existing`, a list already judged
/// trustworthy) and that has no liveness is removed; a node that merely
/// lost its liveness, however long ago, never is. Nodes already removed
/// are skipped.
pub fn removable_nodes(nodes: &[NodeStatus], existing: Option<&BTreeSet<String>>) -> Vec<String> {
    let Some(existing) = existing else {
        return Vec::new();
    };
    nodes
        .iter()
        .filter(|n| !n.alive && n.removed.is_none() && n.blocks > 0)
        .filter(|n| {
            !existing.contains(&n.node)
                || crate::planted::on(crate::planted::Bug::FreeOnLivenessExpiry)
        })
        .map(|n| n.node.clone())
        .collect()
}
