//! The per-node allocation state, pure: which blocks the node leases, which
//! addresses are taken, and which attachment owns them. coild keeps one in
//! memory, rebuilt from the journal at start and changed only after the
//! journal has the change (or, for a reservation, rolled back if the
//! journal refuses it). No I/O here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::journal::{Attachment, AttachmentKey, BlockLease, LeaseState};
use crate::kernel::WireSpec;
use crate::store::model::{addr_to_u128, net_from_u128, Family};

/// Host end of a pod's veth: `coil` + 11 hex digits of a 64-bit FNV-1a
/// hash of "network/container id/ifname" (15 characters, the kernel's
/// limit), so the name is stable across restarts, the journal can be
/// rebuilt from the kernel, and two networks' attachments of one container
/// never share a host veth. A format-1 attachment (no network) keeps the
/// name it was wired with: the hash of "container id/ifname".
pub fn host_veth_name(key: &AttachmentKey) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let network: &[u8] = if key.network.is_empty() {
        &[]
    } else {
        key.network.as_bytes()
    };
    let sep: &[u8] = if key.network.is_empty() { &[] } else { b"/" };
    for b in network
        .iter()
        .chain(sep)
        .copied()
        .chain(key.container_id.bytes())
        .chain(std::iter::once(b'/'))
        .chain(key.ifname.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("coil{:011x}", h >> 20)
}

/// Longest IFLA_IFALIAS the kernel keeps.
const MAX_ALIAS: usize = 255;

/// IFLA_IFALIAS of the host veth, identifying the attachment:
/// `coil:IFNAME:NETWORK:CONTAINERID` (`coil:IFNAME:CONTAINERID` for a
/// format-1 attachment). Network names and container ids are validated to
/// `[A-Za-z0-9_.-]`, so ':' separates them unambiguously; the container id
/// is cut to what fits in 255 bytes.
pub fn veth_alias(key: &AttachmentKey) -> String {
    let head = if key.network.is_empty() {
        format!("coil:{}:", key.ifname)
    } else {
        format!("coil:{}:{}:", key.ifname, key.network)
    };
    let room = MAX_ALIAS.saturating_sub(head.len());
    let cid: String = key.container_id.chars().take(room).collect();
    format!("{head}{cid}")
}

/// Parses [`veth_alias`] back into a key (network empty for a format-1
/// alias); the container id may be a prefix when it was too long.
pub fn parse_alias(alias: &str) -> Option<AttachmentKey> {
    let rest = alias.strip_prefix("coil:")?;
    let parts: Vec<&str> = rest.split(':').collect();
    let (ifname, network, cid) = match parts.as_slice() {
        [ifname, cid] => (*ifname, "", *cid),
        [ifname, network, cid] if !network.is_empty() => (*ifname, *network, *cid),
        _ => return None,
    };
    if ifname.is_empty() || cid.is_empty() {
        return None;
    }
    Some(AttachmentKey::new(network, cid, ifname))
}

/// What `a` looks like in the kernel: the one builder of a [`WireSpec`]
/// from an attachment, for coild's ADD and CHECK and for recovery's
/// roll-forward (an MTU of 0 means the default 1500).
pub fn wire_spec(a: &Attachment, mtu: u32) -> WireSpec {
    WireSpec {
        netns: a.netns.clone(),
        ifname: a.key.ifname.clone(),
        host_veth: a.host_veth.clone(),
        alias: veth_alias(&a.key),
        addresses: a.addresses.iter().map(|x| x.addr).collect(),
        mtu: if mtu == 0 { 1500 } else { mtu },
    }
}

/// The address at `offset` inside `block`.
pub fn address_at(block: &IpNet, offset: u64) -> Option<IpAddr> {
    let fam = Family::of(block);
    let start = addr_to_u128(block.network()) + u128::from(offset);
    net_from_u128(fam, start, fam.bits()).map(|n| n.addr())
}

/// Addresses in a block.
pub fn block_len(block: &IpNet) -> u64 {
    1u64 << (block.max_prefix_len() - block.prefix_len()).min(63)
}

/// Picks the first free address of `block` at or after offset `cursor`,
/// wrapping around, so that a freed address is not handed out again until
/// the rest of the block has been used (no immediate reuse). Returns the
/// address and the new cursor (the offset after it).
pub fn next_free(block: &IpNet, cursor: u64, used: &BTreeSet<IpAddr>) -> Option<(IpAddr, u64)> {
    let n = block_len(block);
    let start = cursor % n;
    for step in 0..n {
        let off = (start + step) % n;
        let a = address_at(block, off)?;
        if !used.contains(&a) {
            return Some((a, (off + 1) % n));
        }
    }
    None
}

/// One leased block as the allocator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedBlock {
    pub lease: BlockLease,
    /// Addresses of this block that are reserved or assigned.
    pub used: BTreeSet<IpAddr>,
}

impl LeasedBlock {
    /// Is this a usable (leased, not quarantined or releasing) `family`
    /// block of `pool`?
    pub fn usable_in(&self, pool: &str, family: Family) -> bool {
        self.lease.pool == pool
            && self.lease.state == LeaseState::Leased
            && Family::of(&self.lease.block) == family
    }

    pub fn free(&self) -> u64 {
        block_len(&self.lease.block) - self.used.len() as u64
    }
}

/// A reservation made by [`NodeState::reserve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub block: IpNet,
    pub addr: IpAddr,
    /// The lease with its cursor advanced (to persist with the attachment).
    pub lease: BlockLease,
}

/// The node's allocation state.
#[derive(Debug, Default, Clone)]
pub struct NodeState {
    blocks: BTreeMap<IpNet, LeasedBlock>,
    attachments: BTreeMap<AttachmentKey, Attachment>,
}

impl NodeState {
    /// Rebuilds the state from the journal's records.
    pub fn from_records(leases: Vec<BlockLease>, attachments: Vec<Attachment>) -> NodeState {
        let mut s = NodeState::default();
        for l in leases {
            s.blocks.insert(
                l.block,
                LeasedBlock {
                    lease: l,
                    used: BTreeSet::new(),
                },
            );
        }
        for a in attachments {
            s.insert_attachment(a);
        }
        s
    }

    pub fn attachment(&self, key: &AttachmentKey) -> Option<&Attachment> {
        self.attachments.get(key)
    }

    /// The attachment a request for `key` addresses: the one of its network,
    /// else a format-1 attachment of the same container id and ifname (its
    /// network is unknown; the container id and ifname are unique on the
    /// node's pods, so it is the same attachment).
    pub fn lookup(&self, key: &AttachmentKey) -> Option<&Attachment> {
        self.attachments.get(key).or_else(|| {
            if key.network.is_empty() {
                return None;
            }
            self.attachments.get(&key.with_network(""))
        })
    }

    pub fn attachments(&self) -> impl Iterator<Item = &Attachment> {
        self.attachments.values()
    }

    pub fn blocks(&self) -> impl Iterator<Item = &LeasedBlock> {
        self.blocks.values()
    }

    /// Records an attachment and marks its addresses used.
    pub fn insert_attachment(&mut self, a: Attachment) {
        for x in &a.addresses {
            if let Some(b) = self.blocks.get_mut(&x.block) {
                b.used.insert(x.addr);
            }
        }
        self.attachments.insert(a.key.clone(), a);
    }

    /// Forgets an attachment and frees its addresses. Call only after the
    /// journal no longer holds it (and its kernel state is gone).
    pub fn remove_attachment(&mut self, key: &AttachmentKey) -> Option<Attachment> {
        let a = self.attachments.remove(key)?;
        for x in &a.addresses {
            if let Some(b) = self.blocks.get_mut(&x.block) {
                b.used.remove(&x.addr);
            }
        }
        Some(a)
    }

    /// Adds a newly leased block, or replaces the record of a block known
    /// already (a quarantined block leased again), keeping its used
    /// addresses.
    pub fn insert_lease(&mut self, l: BlockLease) {
        match self.blocks.get_mut(&l.block) {
            Some(b) => b.lease = l,
            None => {
                self.blocks.insert(
                    l.block,
                    LeasedBlock {
                        lease: l,
                        used: BTreeSet::new(),
                    },
                );
            }
        }
    }

    /// Removes a block (released or lost). Its attachments stay recorded.
    pub fn remove_lease(&mut self, block: &IpNet) -> Option<LeasedBlock> {
        self.blocks.remove(block)
    }

    /// Reserves a `family` address from a usable block of `pool` (the
    /// fullest one with room, to keep blocks releasable), marking it used at
    /// once so a concurrent ADD cannot take it. None when no leased block
    /// of that family has room.
    pub fn reserve(&mut self, pool: &str, family: Family) -> Option<Reservation> {
        let block = self
            .blocks
            .values()
            .filter(|b| b.usable_in(pool, family) && b.free() > 0)
            .min_by_key(|b| (b.free(), b.lease.block))
            .map(|b| b.lease.block)?;
        let b = self.blocks.get_mut(&block)?;
        let (addr, cursor) = next_free(&block, u64::from(b.lease.alloc_cursor), &b.used)?;
        b.used.insert(addr);
        b.lease.alloc_cursor = u32::try_from(cursor).unwrap_or(0);
        Some(Reservation {
            block,
            addr,
            lease: b.lease.clone(),
        })
    }

    /// Undoes a reservation the journal refused.
    pub fn unreserve(&mut self, r: &Reservation) {
        if let Some(b) = self.blocks.get_mut(&r.block) {
            b.used.remove(&r.addr);
        }
    }

    /// Free addresses in usable blocks of any pool.
    pub fn free_addresses(&self) -> u64 {
        self.blocks
            .values()
            .filter(|b| b.lease.state == LeaseState::Leased)
            .map(LeasedBlock::free)
            .sum()
    }

    /// Does the node lease a usable `family` block of `pool` with room?
    pub fn has_room(&self, pool: &str, family: Family) -> bool {
        self.blocks
            .values()
            .any(|b| b.usable_in(pool, family) && b.free() > 0)
    }

    /// The families of the usable blocks the node leases from `pool`,
    /// IPv4 first.
    pub fn families_of(&self, pool: &str) -> Vec<Family> {
        [Family::Ipv4, Family::Ipv6]
            .into_iter()
            .filter(|f| self.blocks.values().any(|b| b.usable_in(pool, *f)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{AssignedAddress, AttachmentState};

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    fn lease(block: &str) -> BlockLease {
        BlockLease {
            pool: "default".into(),
            block: net(block),
            epoch: 1,
            state: LeaseState::Leased,
            alloc_cursor: 0,
        }
    }

    #[test]
    fn veth_names_are_stable_short_and_distinct() {
        let a = host_veth_name(&AttachmentKey::new("k8s", "abc", "eth0"));
        assert_eq!(a, host_veth_name(&AttachmentKey::new("k8s", "abc", "eth0")));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("coil"));
        assert_ne!(a, host_veth_name(&AttachmentKey::new("k8s", "abc", "eth1")));
        assert_ne!(a, host_veth_name(&AttachmentKey::new("k8s", "abd", "eth0")));
        let k = AttachmentKey::new("k8s", "abc", "eth0");
        let al = veth_alias(&k);
        assert_eq!(al, "coil:eth0:k8s:abc");
        assert_eq!(parse_alias(&al), Some(k));
        // Networks keep their veths apart; a format-1 key keeps its old name.
        assert_ne!(
            a,
            host_veth_name(&AttachmentKey::new("other", "abc", "eth0"))
        );
        // The name format 1 gave this attachment (tests/fixtures).
        let legacy = AttachmentKey::new("", "fxcontainer1", "eth0");
        assert_eq!(host_veth_name(&legacy), "coil7f6dec46473");
        let legacy = AttachmentKey::new("", "abc", "eth0");
        assert_eq!(parse_alias("coil:eth0:abc"), Some(legacy));
        assert_eq!(parse_alias("coil:eth0::abc"), None);
        assert_eq!(parse_alias("coil:eth0:a:b:c"), None);
        let long = AttachmentKey::new("n".repeat(128), "c".repeat(256), "eth0");
        let al = veth_alias(&long);
        assert_eq!(al.len(), 255);
        let back = parse_alias(&al).expect("parses");
        assert_eq!(back.network, long.network);
        assert!(long.container_id.starts_with(&back.container_id));
    }

    #[test]
    fn no_immediate_reuse() {
        let b = net("10.0.0.0/30");
        let mut used = BTreeSet::new();
        let (a0, c) = next_free(&b, 0, &used).expect("free");
        assert_eq!(a0.to_string(), "10.0.0.0");
        used.insert(a0);
        let (a1, c) = next_free(&b, c, &used).expect("free");
        assert_eq!(a1.to_string(), "10.0.0.1");
        used.remove(&a0); // freed, but the cursor moves on
        used.insert(a1);
        let (a2, c) = next_free(&b, c, &used).expect("free");
        assert_eq!(a2.to_string(), "10.0.0.2");
        used.insert(a2);
        let (a3, c) = next_free(&b, c, &used).expect("free");
        assert_eq!(a3.to_string(), "10.0.0.3");
        used.insert(a3);
        let (again, _) = next_free(&b, c, &used).expect("wraps");
        assert_eq!(again, a0);
        used.insert(again);
        assert_eq!(next_free(&b, 0, &used), None);
    }

    #[test]
    fn each_family_reserves_from_its_own_blocks() {
        let mut s =
            NodeState::from_records(vec![lease("10.0.0.0/31"), lease("fd00::/127")], vec![]);
        assert_eq!(s.families_of("default"), vec![Family::Ipv4, Family::Ipv6]);
        let a = s.reserve("default", Family::Ipv4).expect("v4");
        let b = s.reserve("default", Family::Ipv6).expect("v6");
        assert_eq!(a.block, net("10.0.0.0/31"));
        assert_eq!(b.block, net("fd00::/127"));
        assert!(b.addr.is_ipv6());
        assert!(s.reserve("default", Family::Ipv6).is_some());
        assert!(s.reserve("default", Family::Ipv6).is_none(), "v6 full");
        assert!(s.has_room("default", Family::Ipv4), "v4 untouched");
        s.unreserve(&b);
        assert!(s.has_room("default", Family::Ipv6));
        assert_eq!(s.families_of("other"), Vec::<Family>::new());
    }

    #[test]
    fn ipv6_offsets() {
        let b = net("fd00::100/120");
        assert_eq!(
            address_at(&b, 255).map(|a| a.to_string()),
            Some("fd00::1ff".into())
        );
        assert_eq!(block_len(&b), 256);
    }

    #[test]
    fn reserve_fills_the_fullest_block_and_unreserves() {
        let mut s =
            NodeState::from_records(vec![lease("10.0.0.0/30"), lease("10.0.0.4/30")], vec![]);
        s.insert_attachment(Attachment {
            key: AttachmentKey::new("k8s", "c", "eth0"),
            netns: "/x".into(),
            pod_namespace: String::new(),
            pod_name: String::new(),
            pool: "default".into(),
            addresses: vec![AssignedAddress {
                addr: "10.0.0.4".parse().expect("ip"),
                block: net("10.0.0.4/30"),
            }],
            host_veth: "v".into(),
            state: AttachmentState::Wired,
            boot_id: "b".into(),
            created_unix: 0,
        });
        let r = s.reserve("default", Family::Ipv4).expect("room");
        assert_eq!(r.block, net("10.0.0.4/30"), "fullest block first");
        assert_eq!(s.free_addresses(), 8 - 2);
        s.unreserve(&r);
        assert_eq!(s.free_addresses(), 8 - 1);
        assert!(s.reserve("other", Family::Ipv4).is_none());
        assert!(
            s.reserve("default", Family::Ipv6).is_none(),
            "no IPv6 block"
        );
        for _ in 0..7 {
            assert!(s.reserve("default", Family::Ipv4).is_some());
        }
        assert!(s.reserve("default", Family::Ipv4).is_none(), "all 8 used");
        assert!(!s.has_room("default", Family::Ipv4));
        s.remove_attachment(&AttachmentKey::new("k8s", "c", "eth0"));
        assert_eq!(s.free_addresses(), 1);
    }
}
