//! Pure parts of the cluster store: validation, the key layout, block
//! arithmetic and overlap detection. No I/O; everything here is unit
//! tested without a store.
//!
//! The layout is documented for operators in docs/etcd-schema.md; keep the
//! two in step.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use super::StoreError;

/// The schema version this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;
/// Most subnets one pool may hold (bounded so that every pool operation
/// fits in one etcd transaction under etcd's default 128-op limit).
pub const MAX_SUBNETS_PER_POOL: usize = 64;
/// Most blocks one subnet may be carved into.
pub const MAX_BLOCKS_PER_SUBNET_LOG2: u8 = 16;
/// Largest block size (log2 of the addresses per block) for IPv4 pools.
pub const MAX_BLOCK_SIZE_V4: u8 = 24;
/// Largest block size for IPv6 pools. Blocks are leased whole and each pod
/// takes one address, so a block of 2^32 addresses is already far beyond
/// what a node can use.
pub const MAX_BLOCK_SIZE_V6: u8 = 32;

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::Ipv4,
            IpNet::V6(_) => Family::Ipv6,
        }
    }

    pub fn of_addr(a: &IpAddr) -> Family {
        match a {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    pub fn bits(self) -> u8 {
        match self {
            Family::Ipv4 => 32,
            Family::Ipv6 => 128,
        }
    }

    pub fn max_block_size(self) -> u8 {
        match self {
            Family::Ipv4 => MAX_BLOCK_SIZE_V4,
            Family::Ipv6 => MAX_BLOCK_SIZE_V6,
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Family::Ipv4 => "4",
            Family::Ipv6 => "6",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        })
    }
}

/// The IPv6 half of a dual-stack pool: its own block size and subnets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolPart {
    /// log2 of the number of addresses in one IPv6 block.
    pub block_size: u8,
    /// IPv6 subnets in address order.
    pub subnets: Vec<IpNet>,
}

/// An address pool as stored (`pools/<name>`).
///
/// A single-family pool has `family`, `block_size` and `subnets`. A
/// dual-stack pool is an IPv4 pool (`family` ipv4) with an `ipv6` part:
/// every pod of the pool gets one address of each family, and a node leases
/// the blocks of the two families independently (see docs/dual-stack.md).
/// A pool written before dual-stack existed has no `ipv6` and reads as it
/// always did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub name: String,
    pub family: Family,
    /// log2 of the number of addresses in one block of `family`.
    pub block_size: u8,
    /// Subnets of `family` in address order.
    pub subnets: Vec<IpNet>,
    /// The IPv6 part of a dual-stack pool (then `family` is ipv4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<PoolPart>,
    pub created_unix: u64,
    /// The store revision of this version of the pool (not stored in the
    /// value; filled in on read). Writes that depend on the pool's shape are
    /// fenced on it.
    #[serde(skip)]
    pub revision: i64,
}

impl Pool {
    /// The families whose addresses every pod of this pool gets, IPv4 first.
    pub fn families(&self) -> Vec<Family> {
        match &self.ipv6 {
            Some(_) => vec![Family::Ipv4, Family::Ipv6],
            None => vec![self.family],
        }
    }

    /// Does the pool hold both families?
    pub fn is_dual(&self) -> bool {
        self.ipv6.is_some()
    }

    /// The block size of the pool's `family` blocks, if it has that family.
    pub fn block_size_of(&self, family: Family) -> Option<u8> {
        match &self.ipv6 {
            Some(p) if family == Family::Ipv6 => Some(p.block_size),
            _ if family == self.family => Some(self.block_size),
            _ => None,
        }
    }

    /// The pool's subnets of `family` (empty if it has none).
    pub fn subnets_of(&self, family: Family) -> &[IpNet] {
        match &self.ipv6 {
            Some(p) if family == Family::Ipv6 => &p.subnets,
            _ if family == self.family => &self.subnets,
            _ => &[],
        }
    }

    /// Every subnet of the pool: the first family's, then the IPv6 part's.
    /// Block indices follow this order.
    pub fn all_subnets(&self) -> impl Iterator<Item = &IpNet> + '_ {
        self.subnets
            .iter()
            .chain(self.ipv6.iter().flat_map(|p| p.subnets.iter()))
    }

    /// Blocks in one subnet (of either family).
    pub fn blocks_in(&self, subnet: &IpNet) -> u64 {
        let bs = self.block_size_of(Family::of(subnet)).unwrap_or(0);
        let host = subnet.max_prefix_len() - subnet.prefix_len();
        1u64 << host.saturating_sub(bs).min(63)
    }

    /// Blocks in the whole pool, both families.
    pub fn total_blocks(&self) -> u64 {
        self.all_subnets().map(|s| self.blocks_in(s)).sum()
    }

    /// The pool indices of `family`'s blocks: `start..end`.
    pub fn family_range(&self, family: Family) -> std::ops::Range<u64> {
        let mut start = 0u64;
        for s in self.all_subnets() {
            if Family::of(s) == family {
                break;
            }
            start += self.blocks_in(s);
        }
        let n: u64 = self
            .subnets_of(family)
            .iter()
            .map(|s| self.blocks_in(s))
            .sum();
        start..start + n
    }

    /// Addresses in one block of the pool's first family.
    pub fn addresses_per_block(&self) -> u128 {
        1u128 << self.block_size
    }

    /// Prefix length of the pool's first family's blocks.
    pub fn block_prefix(&self) -> u8 {
        self.family.bits() - self.block_size
    }

    /// Prefix length of `family`'s blocks, if the pool has that family.
    pub fn block_prefix_of(&self, family: Family) -> Option<u8> {
        self.block_size_of(family).map(|bs| family.bits() - bs)
    }

    /// The `index`th block of the pool (subnets in the order of
    /// [`Pool::all_subnets`]), with the subnet it lies in.
    pub fn block_at(&self, index: u64) -> Option<(IpNet, IpNet)> {
        let mut rest = index;
        for s in self.all_subnets() {
            let n = self.blocks_in(s);
            if rest < n {
                let family = Family::of(s);
                let bs = self.block_size_of(family)?;
                let start = addr_to_u128(s.network()) + (u128::from(rest) << bs);
                let net = net_from_u128(family, start, family.bits() - bs)?;
                return Some((net, *s));
            }
            rest -= n;
        }
        None
    }

    /// The first and last pool index of the subnet that holds `index`.
    pub fn subnet_span(&self, index: u64) -> Option<(u64, u64)> {
        let mut base = 0u64;
        for s in self.all_subnets() {
            let n = self.blocks_in(s);
            if index < base + n {
                return Some((base, base + n - 1));
            }
            base += n;
        }
        None
    }

    /// The pool index of `block`, if it is one of this pool's blocks.
    pub fn index_of(&self, block: &IpNet) -> Option<u64> {
        let family = Family::of(block);
        let bs = self.block_size_of(family)?;
        if block.prefix_len() != family.bits() - bs {
            return None;
        }
        let mut base = 0u64;
        for s in self.all_subnets() {
            if s.contains(block) {
                let off = (addr_to_u128(block.network()) - addr_to_u128(s.network())) >> bs;
                return Some(base + off as u64);
            }
            base += self.blocks_in(s);
        }
        None
    }

    /// The block of this pool that holds `addr`.
    pub fn block_of(&self, addr: IpAddr) -> Option<IpNet> {
        let family = Family::of_addr(&addr);
        let bs = self.block_size_of(family)?;
        if !self.subnets_of(family).iter().any(|s| s.contains(&addr)) {
            return None;
        }
        let start = (addr_to_u128(addr) >> bs) << bs;
        net_from_u128(family, start, family.bits() - bs)
    }
}

/// What an administrator asks for when creating a pool. `subnets` may hold
/// both families: then the pool is dual-stack, and its IPv6 blocks have
/// `ipv6_block_size` (default `block_size`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    pub name: String,
    pub subnets: Vec<IpNet>,
    pub block_size: u8,
    pub ipv6_block_size: Option<u8>,
}

impl PoolSpec {
    /// A single-family (or same-block-size dual-stack) spec.
    pub fn new(name: impl Into<String>, subnets: Vec<IpNet>, block_size: u8) -> PoolSpec {
        PoolSpec {
            name: name.into(),
            subnets,
            block_size,
            ipv6_block_size: None,
        }
    }

    /// The block size of `family`'s blocks under this spec.
    pub fn block_size_of(&self, family: Family) -> u8 {
        match family {
            Family::Ipv4 => self.block_size,
            Family::Ipv6 => self.ipv6_block_size.unwrap_or(self.block_size),
        }
    }

    /// The pool this spec describes (subnets sorted), not yet validated.
    pub fn to_pool(&self, created_unix: u64) -> Pool {
        let mut v4: Vec<IpNet> = Vec::new();
        let mut v6: Vec<IpNet> = Vec::new();
        for s in &self.subnets {
            match Family::of(s) {
                Family::Ipv4 => v4.push(*s),
                Family::Ipv6 => v6.push(*s),
            }
        }
        v4.sort();
        v6.sort();
        let (family, subnets, ipv6) = match (v4.is_empty(), v6.is_empty()) {
            (false, false) => (
                Family::Ipv4,
                v4,
                Some(PoolPart {
                    block_size: self.block_size_of(Family::Ipv6),
                    subnets: v6,
                }),
            ),
            (true, _) => (Family::Ipv6, v6, None),
            (false, true) => (Family::Ipv4, v4, None),
        };
        Pool {
            name: self.name.clone(),
            family,
            block_size: self.block_size_of(family),
            subnets,
            ipv6,
            created_unix,
            revision: 0,
        }
    }
}

/// A block lease as stored (`blocks/<pool>/<hex>`). Present only while the
/// block is leased; its create revision is the lease's epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockLease {
    pub pool: String,
    pub block: IpNet,
    pub node: String,
    pub acquired_unix: u64,
    /// The lease's epoch: the store revision that created it. Unique per
    /// incarnation, so a release can never free a later lease of the same
    /// block. Not stored in the value; filled in on read.
    #[serde(skip)]
    pub epoch: i64,
}

/// A node's liveness record (`nodes/<node>`), bound to a store lease that
/// the node keeps alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node: String,
    pub boot_id: String,
    pub started_unix: u64,
    pub version: String,
}

/// The removal fence of a node (`removed/<node>`): written in the same
/// transaction that frees the node's blocks, on proof that its pods are
/// gone (an operator's `coilctl node remove`, or its Kubernetes Node
/// deleted). While it exists the node leases no block and serves no
/// address from its old ones; `coilctl node readmit` lifts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovalRecord {
    pub node: String,
    pub removed_unix: u64,
    /// Who removed it and why.
    pub reason: String,
    /// The blocks freed with it.
    #[serde(default)]
    pub blocks: Vec<IpNet>,
}

/// The controller's note that a node holding blocks lost its liveness
/// (`unreachable/<node>`). Only a report: nothing is freed for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreachableRecord {
    pub node: String,
    pub since_unix: u64,
}

/// A node as `coilctl node list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    pub node: String,
    /// True while its liveness key exists (its lease is kept alive).
    pub alive: bool,
    pub boot_id: Option<String>,
    pub started_unix: Option<u64>,
    pub blocks: usize,
    /// Since when the controller has seen it without liveness while it
    /// holds blocks (None: reachable, or not noted yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreachable_since: Option<u64>,
    /// Its removal fence, if it was removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed: Option<RemovalRecord>,
}

impl NodeStatus {
    /// A node seen only through its leases or fence (no liveness key).
    pub fn gone(node: &str) -> NodeStatus {
        NodeStatus {
            node: node.to_string(),
            alive: false,
            boot_id: None,
            started_unix: None,
            blocks: 0,
            unreachable_since: None,
            removed: None,
        }
    }
}

/// An entry of the address index (`addresses/<family>/<hex>`), mirrored
/// asynchronously by coild from its journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressRecord {
    pub address: IpAddr,
    pub pool: String,
    pub block: IpNet,
    pub node: String,
    /// The CNI network the attachment belongs to (empty for attachments
    /// made before coil keyed them by network).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    #[serde(default)]
    pub pod_namespace: String,
    #[serde(default)]
    pub pod_name: String,
}

/// The schema marker (`schema`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaRecord {
    pub version: u32,
}

/// The byte-exact value of the schema key this build writes; every
/// mutation compares it, so a future schema fences old writers out.
pub fn schema_value() -> Vec<u8> {
    format!("{{\"version\":{SCHEMA_VERSION}}}").into_bytes()
}

// ------------------------------------------------------------------ keys

/// Key builder under a configurable prefix (default `/coil/`).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Result<Keys, StoreError> {
        if prefix.is_empty() || !prefix.starts_with('/') || !prefix.ends_with('/') {
            return Err(StoreError::Invalid(format!(
                "etcd prefix {prefix:?} must start and end with '/' (like /coil/)"
            )));
        }
        if prefix.len() > 128 || prefix.chars().any(|c| c.is_control()) {
            return Err(StoreError::Invalid(format!(
                "etcd prefix {prefix:?} is too long or has control characters"
            )));
        }
        Ok(Keys {
            prefix: prefix.to_string(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn schema(&self) -> String {
        format!("{}schema", self.prefix)
    }

    pub fn pools(&self) -> String {
        format!("{}pools/", self.prefix)
    }

    pub fn pool(&self, name: &str) -> String {
        format!("{}pools/{name}", self.prefix)
    }

    pub fn subnets(&self) -> String {
        format!("{}subnets/", self.prefix)
    }

    pub fn subnet(&self, s: &IpNet) -> String {
        format!(
            "{}subnets/{}/{}/{:03}",
            self.prefix,
            Family::of(s).tag(),
            hex(s.network()),
            s.prefix_len()
        )
    }

    pub fn blocks(&self) -> String {
        format!("{}blocks/", self.prefix)
    }

    pub fn pool_blocks(&self, pool: &str) -> String {
        format!("{}blocks/{pool}/", self.prefix)
    }

    pub fn block(&self, pool: &str, block: &IpNet) -> String {
        format!("{}blocks/{pool}/{}", self.prefix, hex(block.network()))
    }

    /// The key range `[start, end)` of the blocks of `pool` inside `net`.
    pub fn block_range(&self, pool: &str, net: &IpNet) -> (String, String) {
        let start = self.block(pool, net);
        let end = format!("{}blocks/{pool}/{}~", self.prefix, hex(net.broadcast()));
        (start, end)
    }

    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.prefix)
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.prefix)
    }

    pub fn removed_prefix(&self) -> String {
        format!("{}removed/", self.prefix)
    }

    /// A node's removal fence.
    pub fn removed(&self, node: &str) -> String {
        format!("{}removed/{node}", self.prefix)
    }

    pub fn unreachable_prefix(&self) -> String {
        format!("{}unreachable/", self.prefix)
    }

    /// The controller's note that a node is unreachable.
    pub fn unreachable(&self, node: &str) -> String {
        format!("{}unreachable/{node}", self.prefix)
    }

    /// The controller's leader key (bound to the leader's etcd lease).
    pub fn leader(&self) -> String {
        format!("{}controller/leader", self.prefix)
    }

    pub fn addresses(&self) -> String {
        format!("{}addresses/", self.prefix)
    }

    pub fn address(&self, a: IpAddr) -> String {
        format!(
            "{}addresses/{}/{}",
            self.prefix,
            Family::of_addr(&a).tag(),
            hex(a)
        )
    }

    /// The key range `[start, end)` of the address index inside `net`.
    pub fn address_range(&self, net: &IpNet) -> (String, String) {
        let start = self.address(net.network());
        let end = format!("{}~", self.address(net.broadcast()));
        (start, end)
    }
}

/// Fixed-width lowercase hex of an address, so keys sort like addresses.
pub fn hex(a: IpAddr) -> String {
    match a {
        IpAddr::V4(v4) => format!("{:08x}", u32::from(v4)),
        IpAddr::V6(v6) => format!("{:032x}", u128::from(v6)),
    }
}

/// Parses [`hex`] back.
pub fn unhex(family: Family, s: &str) -> Option<IpAddr> {
    match family {
        Family::Ipv4 if s.len() == 8 => u32::from_str_radix(s, 16)
            .ok()
            .map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        Family::Ipv6 if s.len() == 32 => u128::from_str_radix(s, 16)
            .ok()
            .map(|v| IpAddr::V6(Ipv6Addr::from(v))),
        _ => None,
    }
}

pub fn addr_to_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

pub fn net_from_u128(family: Family, start: u128, prefix: u8) -> Option<IpNet> {
    match family {
        Family::Ipv4 => {
            let v = u32::try_from(start).ok()?;
            Ipv4Net::new(Ipv4Addr::from(v), prefix).ok().map(IpNet::V4)
        }
        Family::Ipv6 => Ipv6Net::new(Ipv6Addr::from(start), prefix)
            .ok()
            .map(IpNet::V6),
    }
}

// ------------------------------------------------------- stored entries
//
// Every value read back from the store is checked against its key (and,
// for a lease, against its pool) before coil uses it: a value written by
// hand, by a buggy or newer writer, or damaged in transit must never put a
// prefix into table 119, hand out an address or stop the rest of a read.
// The rules are documented in docs/etcd-schema.md ("Validation on read").

/// A store entry that failed to decode or to validate against its key or
/// its pool. Listings skip and report it; coil's own writes never
/// overwrite or delete it (only an explicit administrative removal does).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BadEntry {
    pub key: String,
    pub reason: String,
}

impl std::fmt::Display for BadEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// What a listing read: the entries that passed validation (in key order)
/// and the bad ones it skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing<T> {
    pub items: Vec<T>,
    pub bad: Vec<BadEntry>,
}

impl<T> Default for Listing<T> {
    fn default() -> Self {
        Listing {
            items: Vec::new(),
            bad: Vec::new(),
        }
    }
}

impl Keys {
    /// The rest of `key` after `<prefix><section>`, if the key is there.
    fn under<'a>(&self, key: &'a str, section: &str) -> Option<&'a str> {
        key.strip_prefix(self.prefix.as_str())?
            .strip_prefix(section)
    }

    /// The pool name a `pools/<name>` key names (not validated).
    pub fn pool_of_key<'a>(&self, key: &'a str) -> Option<&'a str> {
        self.under(key, "pools/").filter(|n| !n.contains('/'))
    }

    /// The node name a `nodes/<node>` key names (not validated).
    pub fn node_of_key<'a>(&self, key: &'a str) -> Option<&'a str> {
        self.under(key, "nodes/").filter(|n| !n.contains('/'))
    }

    /// `(pool, hex)` of a `blocks/<pool>/<hex>` key (neither validated).
    pub fn split_block_key<'a>(&self, key: &'a str) -> Option<(&'a str, &'a str)> {
        self.under(key, "blocks/")?
            .split_once('/')
            .filter(|(_, h)| !h.contains('/'))
    }

    /// The block of `pool` that `key` names, if `key` is exactly the key
    /// [`Keys::block`] builds for one of the pool's blocks (right pool,
    /// canonical hex, aligned, inside a subnet).
    pub fn block_of_key(&self, pool: &Pool, key: &str) -> Option<IpNet> {
        let (name, h) = self.split_block_key(key)?;
        if name != pool.name {
            return None;
        }
        let family = match h.len() {
            8 => Family::Ipv4,
            32 => Family::Ipv6,
            _ => return None,
        };
        let start = unhex(family, h)?;
        let net = net_from_u128(family, addr_to_u128(start), pool.block_prefix_of(family)?)?;
        if net.network() != start || pool.index_of(&net).is_none() {
            return None;
        }
        (self.block(&pool.name, &net) == key).then_some(net)
    }

    /// The address an `addresses/<4|6>/<hex>` key names, if the key is in
    /// the canonical form [`Keys::address`] builds.
    pub fn address_of_key(&self, key: &str) -> Option<IpAddr> {
        let (tag, h) = self.under(key, "addresses/")?.split_once('/')?;
        let family = [Family::Ipv4, Family::Ipv6]
            .into_iter()
            .find(|f| f.tag() == tag)?;
        let a = unhex(family, h)?;
        (self.address(a) == key).then_some(a)
    }

    /// The subnet a `subnets/<4|6>/<hex>/<len>` key names, if the key is in
    /// the canonical form [`Keys::subnet`] builds.
    pub fn subnet_of_key(&self, key: &str) -> Option<IpNet> {
        let mut parts = self.under(key, "subnets/")?.split('/');
        let (tag, h, len) = (parts.next()?, parts.next()?, parts.next()?);
        let family = [Family::Ipv4, Family::Ipv6]
            .into_iter()
            .find(|f| f.tag() == tag)?;
        let a = unhex(family, h)?;
        let len: u8 = len.parse().ok()?;
        let net = net_from_u128(family, addr_to_u128(a), len)?;
        (net.network() == a && self.subnet(&net) == key).then_some(net)
    }
}

fn canonical(net: &IpNet, what: &str) -> Result<(), String> {
    if *net != net.trunc() {
        return Err(format!(
            "{what} {net} has host bits set (its network is {})",
            net.trunc()
        ));
    }
    Ok(())
}

/// Checks a pool read from `key` (`pools/<name>`): the name matches the
/// key, and the name, family, block size and subnets obey the rules a pool
/// is created with ([`validate_spec`]).
pub fn validate_pool_entry(keys: &Keys, key: &str, pool: &Pool) -> Result<(), String> {
    let name = keys
        .pool_of_key(key)
        .ok_or_else(|| "not a key of the form pools/<name>".to_string())?;
    if pool.name != name {
        return Err(format!(
            "the value names pool {:?}, but the key is pools/{name}",
            pool.name
        ));
    }
    for s in pool.all_subnets() {
        canonical(s, "subnet")?;
    }
    if let Some(s) = pool.subnets.iter().find(|s| Family::of(s) != pool.family) {
        return Err(format!(
            "the pool says {} but its subnet {s} is {}",
            pool.family,
            Family::of(s)
        ));
    }
    if let Some(part) = &pool.ipv6 {
        if pool.family != Family::Ipv4 {
            return Err(format!(
                "the pool says {} and has an ipv6 part; only an ipv4 pool may",
                pool.family
            ));
        }
        if let Some(s) = part.subnets.iter().find(|s| Family::of(s) != Family::Ipv6) {
            return Err(format!("the pool's ipv6 part holds {s}"));
        }
        if part.subnets.is_empty() {
            return Err("the pool's ipv6 part has no subnet".to_string());
        }
    }
    validate_spec(&PoolSpec {
        name: pool.name.clone(),
        subnets: pool.all_subnets().copied().collect(),
        block_size: pool.block_size,
        ipv6_block_size: pool.ipv6.as_ref().map(|p| p.block_size),
    })
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// Checks a block lease read from `key` (`blocks/<pool>/<hex>`) against
/// the key and against `pool`, the valid pool the key names (None when
/// there is no such pool, or its own entry is bad): the value names the
/// key's pool and block; the block is canonical, of the pool's family and
/// block size, and lies inside one of the pool's subnets; the node name is
/// valid; the epoch is a store revision.
pub fn validate_lease(
    keys: &Keys,
    key: &str,
    lease: &BlockLease,
    pool: Option<&Pool>,
) -> Result<(), String> {
    let (key_pool, key_hex) = keys
        .split_block_key(key)
        .ok_or_else(|| "not a key of the form blocks/<pool>/<hex network>".to_string())?;
    if lease.pool != key_pool {
        return Err(format!(
            "the value names pool {:?}, but the key is under blocks/{key_pool}/",
            lease.pool
        ));
    }
    let pool = pool
        .filter(|p| p.name == key_pool)
        .ok_or_else(|| format!("pool {key_pool:?} does not exist or its entry is bad"))?;
    let b = lease.block;
    canonical(&b, "block")?;
    let family = Family::of(&b);
    let (Some(bs), Some(prefix)) = (pool.block_size_of(family), pool.block_prefix_of(family))
    else {
        let families: Vec<String> = pool.families().iter().map(|f| f.to_string()).collect();
        return Err(format!(
            "block {b} is {family}, but pool {} is {}",
            pool.name,
            families.join(" and ")
        ));
    };
    if keys.block(&pool.name, &b) != key {
        let named = [Family::Ipv4, Family::Ipv6]
            .into_iter()
            .find_map(|f| unhex(f, key_hex))
            .map_or_else(|| key_hex.to_string(), |a| a.to_string());
        return Err(format!(
            "the value names block {b}, but the key names the block at {named}"
        ));
    }
    if b.prefix_len() != prefix {
        return Err(format!(
            "block {b} is a /{}, but pool {}'s {family} blocks are /{prefix} (block size {bs})",
            b.prefix_len(),
            pool.name,
        ));
    }
    if pool.index_of(&b).is_none() {
        let subnets: Vec<String> = pool.all_subnets().map(|s| s.to_string()).collect();
        return Err(format!(
            "block {b} lies outside pool {}'s subnets ({})",
            pool.name,
            subnets.join(", ")
        ));
    }
    validate_node_name(&lease.node).map_err(|e| e.to_string())?;
    if lease.epoch <= 0 {
        return Err(format!("epoch {} is not a store revision", lease.epoch));
    }
    Ok(())
}

/// Checks a liveness record read from `key` (`nodes/<node>`): the value
/// names the key's node, and the name is valid.
pub fn validate_node_entry(keys: &Keys, key: &str, rec: &NodeRecord) -> Result<(), String> {
    let node = keys
        .node_of_key(key)
        .ok_or_else(|| "not a key of the form nodes/<node>".to_string())?;
    if rec.node != node {
        return Err(format!(
            "the value names node {:?}, but the key is nodes/{node}",
            rec.node
        ));
    }
    validate_node_name(&rec.node).map_err(|e| e.to_string())
}

/// Checks an address index entry read from `key`
/// (`addresses/<4|6>/<hex>`): the value's address is the key's, it lies
/// inside the value's (canonical) block, and the pool and node names are
/// valid.
pub fn validate_address_entry(keys: &Keys, key: &str, rec: &AddressRecord) -> Result<(), String> {
    let a = keys
        .address_of_key(key)
        .ok_or_else(|| "not a key of the form addresses/<4|6>/<hex address>".to_string())?;
    if rec.address != a {
        return Err(format!(
            "the value names address {}, but the key names {a}",
            rec.address
        ));
    }
    canonical(&rec.block, "block")?;
    if !rec.block.contains(&rec.address) {
        return Err(format!(
            "address {} lies outside its block {}",
            rec.address, rec.block
        ));
    }
    validate_pool_name(&rec.pool).map_err(|e| e.to_string())?;
    validate_node_name(&rec.node).map_err(|e| e.to_string())
}

/// Checks a subnet registry entry read from `key`
/// (`subnets/<4|6>/<hex>/<len>`): the value's subnet is canonical and is
/// the key's, and the pool name is valid.
pub fn validate_subnet_entry(keys: &Keys, key: &str, rec: &SubnetRecord) -> Result<(), String> {
    let s = keys
        .subnet_of_key(key)
        .ok_or_else(|| "not a key of the form subnets/<4|6>/<hex network>/<len>".to_string())?;
    canonical(&rec.subnet, "subnet")?;
    if rec.subnet != s {
        return Err(format!(
            "the value names subnet {}, but the key names {s}",
            rec.subnet
        ));
    }
    validate_pool_name(&rec.pool).map_err(|e| e.to_string())
}

// ------------------------------------------------------------ validation

/// Pool names are DNS-1123 labels, because a pool serves the namespace of
/// the same name.
pub fn validate_pool_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "bad pool name {name:?}: use 1-63 lowercase letters, digits and '-', \
             starting and ending with a letter or digit (a Kubernetes namespace name)"
        )))
    }
}

/// Node names are Kubernetes node names (DNS-1123 subdomains) or
/// addresses.
pub fn validate_node_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b':' || b == b'_')
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "bad node name {name:?}: use 1-253 letters, digits, '-', '.', '_' or ':'"
        )))
    }
}

/// Parses a subnet the way coilctl takes it: CIDR with no host bits set.
pub fn parse_subnet(s: &str) -> Result<IpNet, StoreError> {
    let net: IpNet = s.trim().parse().map_err(|_| {
        StoreError::Invalid(format!(
            "malformed subnet {s:?}: expected CIDR like 10.64.0.0/16 or fd00:10::/96"
        ))
    })?;
    if net != net.trunc() {
        return Err(StoreError::Invalid(format!(
            "subnet {s} has host bits set; did you mean {}?",
            net.trunc()
        )));
    }
    Ok(net)
}

/// Checks a subnet against a pool's family and block size.
pub fn validate_subnet(subnet: &IpNet, family: Family, block_size: u8) -> Result<(), StoreError> {
    if Family::of(subnet) != family {
        return Err(StoreError::Invalid(format!(
            "subnet {subnet} is {}, but the pool is {family}",
            Family::of(subnet)
        )));
    }
    let host_bits = subnet.max_prefix_len() - subnet.prefix_len();
    if block_size > host_bits {
        return Err(StoreError::Invalid(format!(
            "block size {block_size} (2^{block_size} addresses) does not fit in subnet {subnet}"
        )));
    }
    if host_bits - block_size > MAX_BLOCKS_PER_SUBNET_LOG2 {
        return Err(StoreError::Invalid(format!(
            "subnet {subnet} would hold 2^{} blocks of size {block_size}; at most 2^{} per subnet \
             (use a larger block size or a smaller subnet)",
            host_bits - block_size,
            MAX_BLOCKS_PER_SUBNET_LOG2
        )));
    }
    Ok(())
}

/// Address ranges no pool may overlap, with why: pods cannot use them (or
/// coil itself does). Checked when a pool is created (and by coilctl when
/// a subnet is added), not when a stored pool is read, so a pool created
/// before the check keeps working.
pub const RESERVED_RANGES: [(IpNet, &str); 10] = [
    (
        IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(0, 0, 0, 0), 8)),
        "\"this network\" (RFC 1122), which holds the unspecified address 0.0.0.0",
    ),
    (
        IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8)),
        "loopback: never routed off a host",
    ),
    (
        IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 0, 0), 16)),
        "link-local, which holds coil's pod gateway 169.254.1.1",
    ),
    (
        IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4)),
        "multicast",
    ),
    (
        IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(240, 0, 0, 0), 4)),
        "reserved (RFC 1112), which holds the limited broadcast 255.255.255.255",
    ),
    (
        IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 128)),
        "the unspecified address",
    ),
    (
        IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128)),
        "loopback",
    ),
    (
        IpNet::V6(Ipv6Net::new_assert(
            Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
            10,
        )),
        "link-local: every interface, pods' included, has its own there",
    ),
    (
        IpNet::V6(Ipv6Net::new_assert(
            Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0),
            8,
        )),
        "multicast",
    ),
    (
        IpNet::V6(Ipv6Net::new_assert(
            Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0),
            96,
        )),
        "IPv4-mapped addresses, which stand for IPv4 peers on dual-stack sockets",
    ),
];

/// Refuses a subnet that overlaps one of the [`RESERVED_RANGES`].
pub fn check_not_reserved(subnet: &IpNet) -> Result<(), StoreError> {
    match RESERVED_RANGES.iter().find(|(r, _)| overlaps(r, subnet)) {
        None => Ok(()),
        Some((r, why)) => Err(StoreError::Invalid(format!(
            "subnet {subnet} overlaps the reserved range {r} ({why}); \
             pod addresses cannot come from it"
        ))),
    }
}

/// Validates a whole pool spec and returns the families its pods get
/// addresses of (IPv4 first).
pub fn validate_spec(spec: &PoolSpec) -> Result<Vec<Family>, StoreError> {
    validate_pool_name(&spec.name)?;
    if spec.subnets.is_empty() {
        return Err(StoreError::Invalid(format!(
            "pool {} needs a subnet",
            spec.name
        )));
    }
    let families: Vec<Family> = [Family::Ipv4, Family::Ipv6]
        .into_iter()
        .filter(|f| spec.subnets.iter().any(|s| Family::of(s) == *f))
        .collect();
    if spec.ipv6_block_size.is_some() && !families.contains(&Family::Ipv6) {
        return Err(StoreError::Invalid(format!(
            "pool {} has an IPv6 block size but no IPv6 subnet",
            spec.name
        )));
    }
    for family in &families {
        let bs = spec.block_size_of(*family);
        if bs > family.max_block_size() {
            return Err(StoreError::Invalid(format!(
                "block size {bs} is out of range for {family}: 0..={}",
                family.max_block_size()
            )));
        }
    }
    if spec.subnets.len() > MAX_SUBNETS_PER_POOL {
        return Err(StoreError::Invalid(format!(
            "{} subnets: a pool holds at most {MAX_SUBNETS_PER_POOL}",
            spec.subnets.len()
        )));
    }
    for (i, s) in spec.subnets.iter().enumerate() {
        let family = Family::of(s);
        validate_subnet(s, family, spec.block_size_of(family))?;
        check_not_reserved(s)?;
        if let Some(o) = spec.subnets[..i].iter().find(|o| overlaps(o, s)) {
            return Err(StoreError::Invalid(format!(
                "subnets {o} and {s} overlap each other"
            )));
        }
    }
    Ok(families)
}

/// Do two networks share any address? (Same network, or containment in
/// either direction: CIDRs never partially overlap.)
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// A registered subnet (`subnets/...` value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetRecord {
    pub subnet: IpNet,
    pub pool: String,
}

/// The first registered subnet that overlaps `s`.
pub fn find_overlap<'a>(s: &IpNet, existing: &'a [SubnetRecord]) -> Option<&'a SubnetRecord> {
    existing.iter().find(|r| overlaps(&r.subnet, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    fn pool(subnets: &[&str], bs: u8) -> Pool {
        let subnets: Vec<IpNet> = subnets.iter().map(|s| net(s)).collect();
        Pool {
            name: "p".into(),
            family: Family::of(&subnets[0]),
            block_size: bs,
            subnets,
            created_unix: 0,
            revision: 0,
            ipv6: None,
        }
    }

    #[test]
    fn overlap_covers_every_shape() {
        assert!(overlaps(&net("10.0.0.0/16"), &net("10.0.0.0/16")));
        assert!(overlaps(&net("10.0.0.0/16"), &net("10.0.1.0/24")));
        assert!(overlaps(&net("10.0.1.0/24"), &net("10.0.0.0/16")));
        assert!(overlaps(&net("10.0.0.0/24"), &net("10.0.0.0/16")));
        assert!(!overlaps(&net("10.0.0.0/24"), &net("10.0.1.0/24")));
        assert!(overlaps(&net("fd00::/64"), &net("fd00::1:0/112")));
        assert!(!overlaps(&net("fd00::/64"), &net("fd01::/64")));
        assert!(!overlaps(&net("10.0.0.0/8"), &net("::/0")));
    }

    #[test]
    fn block_index_round_trips_across_subnets() {
        let p = pool(&["10.0.0.0/24", "10.9.0.0/26"], 4);
        assert_eq!(p.total_blocks(), 16 + 4);
        assert_eq!(p.block_at(0).map(|b| b.0), Some(net("10.0.0.0/28")));
        assert_eq!(p.block_at(15).map(|b| b.0), Some(net("10.0.0.240/28")));
        assert_eq!(p.block_at(16).map(|b| b.0), Some(net("10.9.0.0/28")));
        assert_eq!(p.block_at(19).map(|b| b.0), Some(net("10.9.0.48/28")));
        assert_eq!(p.block_at(20), None);
        for i in 0..20 {
            let (b, _) = p.block_at(i).expect("block");
            assert_eq!(p.index_of(&b), Some(i));
        }
        assert_eq!(p.index_of(&net("10.0.0.0/27")), None);
        assert_eq!(p.index_of(&net("10.1.0.0/28")), None);
        assert_eq!(
            p.block_of("10.9.0.37".parse().expect("ip")),
            Some(net("10.9.0.32/28"))
        );
        assert_eq!(p.block_of("10.1.0.1".parse().expect("ip")), None);
    }

    #[test]
    fn a_dual_stack_pool_indexes_both_families_apart() {
        let spec = PoolSpec {
            name: "d".into(),
            subnets: vec![net("fd00:10::/112"), net("10.0.0.0/24"), net("10.9.0.0/26")],
            block_size: 4,
            ipv6_block_size: Some(8),
        };
        assert!(validate_spec(&spec).is_ok());
        let p = spec.to_pool(0);
        assert_eq!(p.family, Family::Ipv4);
        assert_eq!(p.families(), vec![Family::Ipv4, Family::Ipv6]);
        assert_eq!(p.subnets, vec![net("10.0.0.0/24"), net("10.9.0.0/26")]);
        assert_eq!(p.block_size_of(Family::Ipv6), Some(8));
        assert_eq!(p.total_blocks(), 16 + 4 + 256);
        assert_eq!(p.family_range(Family::Ipv4), 0..20);
        assert_eq!(p.family_range(Family::Ipv6), 20..276);
        assert_eq!(p.block_at(20).map(|b| b.0), Some(net("fd00:10::/120")));
        assert_eq!(p.block_at(275).map(|b| b.0), Some(net("fd00:10::ff00/120")));
        for i in 0..276 {
            let (b, _) = p.block_at(i).expect("block");
            assert_eq!(p.index_of(&b), Some(i), "{b}");
        }
        // A block of the wrong size for its family is none of the pool's.
        assert_eq!(p.index_of(&net("fd00:10::/124")), None);
        assert_eq!(p.index_of(&net("10.0.0.0/24")), None);
        assert_eq!(
            p.block_of("fd00:10::1ff".parse().expect("ip")),
            Some(net("fd00:10::100/120"))
        );
        assert_eq!(
            p.block_of("10.0.0.17".parse().expect("ip")),
            Some(net("10.0.0.16/28"))
        );
        // Stored and read back, the pool keeps its IPv6 part; an old pool
        // value (no ipv6 field) reads as single-family.
        let json = serde_json::to_string(&p).expect("encode");
        let back: Pool = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, p);
        let old = r#"{"name":"p","family":"ipv4","block_size":4,"subnets":["10.0.0.0/24"],"created_unix":0}"#;
        let old: Pool = serde_json::from_str(old).expect("old pool");
        assert_eq!(old.ipv6, None);
        assert_eq!(old.families(), vec![Family::Ipv4]);
        assert_eq!(old.family_range(Family::Ipv6), 16..16);
        // Keys of both families name their own blocks.
        let k = Keys::new("/coil/").expect("keys");
        for b in ["10.9.0.16/28", "fd00:10::ff00/120"] {
            assert_eq!(k.block_of_key(&p, &k.block("d", &net(b))), Some(net(b)));
        }
        // A block size for IPv6 without an IPv6 subnet is an error.
        let e = validate_spec(&PoolSpec {
            name: "d".into(),
            subnets: vec![net("10.0.0.0/24")],
            block_size: 4,
            ipv6_block_size: Some(8),
        })
        .expect_err("no v6 subnet");
        assert!(e.to_string().contains("no IPv6 subnet"), "{e}");
        // Each family is checked with its own block size.
        let e = validate_spec(&PoolSpec {
            name: "d".into(),
            subnets: vec![net("10.0.0.0/24"), net("fd00::/120")],
            block_size: 4,
            ipv6_block_size: Some(9),
        })
        .expect_err("v6 block too big");
        assert!(e.to_string().contains("fd00::/120"), "{e}");
    }

    #[test]
    fn a_bad_dual_stack_pool_entry_is_refused() {
        let k = Keys::new("/coil/").expect("keys");
        let good = PoolSpec {
            name: "d".into(),
            subnets: vec![net("10.0.0.0/24"), net("fd00::/112")],
            block_size: 4,
            ipv6_block_size: None,
        }
        .to_pool(0);
        assert_eq!(validate_pool_entry(&k, &k.pool("d"), &good), Ok(()));
        let mut v6_first = good.clone();
        v6_first.family = Family::Ipv6;
        v6_first.subnets = vec![net("fd00:1::/112")];
        assert!(validate_pool_entry(&k, &k.pool("d"), &v6_first).is_err());
        let mut v4_in_v6 = good.clone();
        if let Some(p) = v4_in_v6.ipv6.as_mut() {
            p.subnets.push(net("10.1.0.0/24"));
        }
        assert!(validate_pool_entry(&k, &k.pool("d"), &v4_in_v6).is_err());
        let mut empty = good.clone();
        if let Some(p) = empty.ipv6.as_mut() {
            p.subnets.clear();
        }
        assert!(validate_pool_entry(&k, &k.pool("d"), &empty).is_err());
        let mut overlapping = good;
        if let Some(p) = overlapping.ipv6.as_mut() {
            p.subnets.push(net("fd00::100/120"));
        }
        assert!(validate_pool_entry(&k, &k.pool("d"), &overlapping).is_err());
    }

    #[test]
    fn ipv6_blocks_are_real_ipv6() {
        let p = pool(&["fd00:10::/112"], 8);
        assert_eq!(p.total_blocks(), 256);
        assert_eq!(p.block_at(1).map(|b| b.0), Some(net("fd00:10::100/120")));
        assert_eq!(p.block_at(255).map(|b| b.0), Some(net("fd00:10::ff00/120")));
        assert_eq!(p.index_of(&net("fd00:10::ff00/120")), Some(255));
    }

    #[test]
    fn keys_sort_like_addresses() {
        let k = Keys::new("/coil/").expect("keys");
        let a = k.block("p", &net("10.0.2.0/24"));
        let b = k.block("p", &net("10.0.10.0/24"));
        assert!(a < b, "{a} < {b}");
        let (s, e) = k.block_range("p", &net("10.0.0.0/16"));
        assert!(s <= a && a < e && b < e);
        assert!(k.block("p", &net("10.1.0.0/24")) > e);
        assert_eq!(
            unhex(Family::Ipv6, &hex("fd00::1".parse().expect("ip"))),
            Some("fd00::1".parse().expect("ip"))
        );
        assert!(Keys::new("coil").is_err());
    }

    #[test]
    fn validation_refuses_bad_specs() {
        let spec = |name: &str, subnets: &[&str], bs: u8| PoolSpec {
            name: name.into(),
            subnets: subnets.iter().map(|s| net(s)).collect(),
            block_size: bs,
            ipv6_block_size: None,
        };
        assert!(validate_spec(&spec("default", &["10.0.0.0/16"], 5)).is_ok());
        assert!(validate_spec(&spec("Default", &["10.0.0.0/16"], 5)).is_err());
        assert!(validate_spec(&spec("a_b", &["10.0.0.0/16"], 5)).is_err());
        assert!(validate_spec(&spec("-a", &["10.0.0.0/16"], 5)).is_err());
        assert!(validate_spec(&spec("ok", &[], 5)).is_err());
        assert!(validate_spec(&spec("ok", &["10.0.0.0/16"], 25)).is_err());
        assert!(validate_spec(&spec("ok", &["10.0.0.0/24"], 9)).is_err());
        // 2^20 blocks in one subnet
        assert!(validate_spec(&spec("ok", &["10.0.0.0/8"], 4)).is_err());
        // Both families: a dual-stack pool, IPv4 first.
        assert_eq!(
            validate_spec(&spec("ok", &["fd00::/112", "10.0.0.0/16"], 5)).expect("dual"),
            vec![Family::Ipv4, Family::Ipv6]
        );
        assert!(validate_spec(&spec("ok", &["10.0.0.0/16", "10.0.4.0/24"], 5)).is_err());
        assert!(validate_spec(&spec("v6", &["fd00::/104"], 8)).is_ok());
        assert!(validate_spec(&spec("v6", &["fd00::/64"], 33)).is_err());
        assert!(parse_subnet("10.0.0.1/24").is_err());
        assert!(parse_subnet("10.0.0.0/33").is_err());
        assert!(parse_subnet("nonsense").is_err());
    }

    #[test]
    fn pools_in_reserved_ranges_are_refused() {
        let spec = |subnet: &str, bs: u8| PoolSpec {
            name: "p".into(),
            subnets: vec![net(subnet)],
            block_size: bs,
            ipv6_block_size: None,
        };
        for (subnet, bs, range) in [
            ("0.0.0.0/24", 4, "0.0.0.0/8"),
            ("127.0.0.0/16", 8, "127.0.0.0/8"),
            ("127.255.255.0/24", 4, "127.0.0.0/8"),
            ("169.254.1.0/24", 4, "169.254.0.0/16"),
            ("169.254.0.0/16", 8, "169.254.0.0/16"),
            // A subnet that contains a reserved range overlaps it too.
            ("169.0.0.0/8", 12, "169.254.0.0/16"),
            ("224.0.0.0/24", 4, "224.0.0.0/4"),
            ("239.255.255.0/24", 4, "224.0.0.0/4"),
            ("240.0.0.0/24", 4, "240.0.0.0/4"),
            ("255.255.255.0/24", 4, "240.0.0.0/4"),
            ("::/112", 8, "::/128"),
            ("::/127", 1, "::/128"),
            ("::ffff:0:0/112", 8, "::ffff:0.0.0.0/96"),
            ("::ffff:10.0.0.0/120", 4, "::ffff:0.0.0.0/96"),
            ("fe80::/112", 8, "fe80::/10"),
            ("febf:ffff::/112", 8, "fe80::/10"),
            ("ff02::/112", 8, "ff00::/8"),
        ] {
            let e = validate_spec(&spec(subnet, bs)).expect_err(subnet);
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("overlaps the reserved range {range} (")),
                "{subnet}: {msg}"
            );
        }
        // ::1/128 fits no pool (a block needs a subnet at least its size),
        // but is refused by name all the same.
        let e = check_not_reserved(&net("::1/128")).expect_err("::1");
        assert!(e.to_string().contains("::1/128 (loopback)"), "{e}");
        assert!(check_not_reserved(&net("::/0")).is_err());
        // Ranges next to the reserved ones are fine.
        for ok in [
            "1.0.0.0/24",
            "10.0.0.0/16",
            "126.255.255.0/24",
            "128.0.0.0/24",
            "169.253.0.0/16",
            "169.255.0.0/16",
            "223.255.255.0/24",
            "100.64.0.0/16",
            "fd00::/112",
            "2001:db8::/112",
            "fec0::/112",
            "fe7f::/112",
            "::2/127",
            "::fffe:0:0/112",
            "::1:0:0:0/112",
        ] {
            assert!(check_not_reserved(&net(ok)).is_ok(), "{ok}");
        }
        assert!(validate_spec(&spec("100.64.0.0/16", 8)).is_ok());
    }

    #[test]
    fn schema_value_parses_as_the_record() {
        let r: SchemaRecord = serde_json::from_slice(&schema_value()).expect("json");
        assert_eq!(r.version, SCHEMA_VERSION);
    }
}

#[cfg(test)]
mod entry_tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    fn keys() -> Keys {
        Keys::new("/coil/").expect("keys")
    }

    fn pool() -> Pool {
        Pool {
            name: "default".into(),
            family: Family::Ipv4,
            block_size: 5,
            subnets: vec![net("10.64.0.0/16"), net("10.70.0.0/24")],
            created_unix: 1,
            revision: 3,
            ipv6: None,
        }
    }

    fn lease(pool: &str, block: &str) -> BlockLease {
        BlockLease {
            pool: pool.into(),
            block: net(block),
            node: "node-1".into(),
            acquired_unix: 1,
            epoch: 7,
        }
    }

    fn check(key: &str, l: &BlockLease) -> Result<(), String> {
        validate_lease(&keys(), key, l, Some(&pool()))
    }

    #[test]
    fn a_lease_must_match_its_key_and_lie_in_its_pool() {
        let k = keys();
        let p = pool();
        let good = lease("default", "10.64.0.32/27");
        let key = k.block("default", &good.block);
        assert_eq!(check(&key, &good), Ok(()));
        assert_eq!(
            check(
                &k.block("default", &net("10.70.0.224/27")),
                &lease("default", "10.70.0.224/27")
            ),
            Ok(())
        );

        let other_pool = lease("other", "10.64.0.32/27");
        let e = check(&key, &other_pool).expect_err("other pool");
        assert!(e.contains("names pool \"other\""), "{e}");

        let other_block = lease("default", "10.64.0.64/27");
        let e = check(&key, &other_block).expect_err("other block");
        assert!(
            e.contains("names block 10.64.0.64/27") && e.contains("10.64.0.32"),
            "{e}"
        );

        let everything = lease("default", "0.0.0.0/0");
        let e = check(&k.block("default", &net("0.0.0.0/0")), &everything).expect_err("/0");
        assert!(e.contains("is a /0") && e.contains("/27"), "{e}");
        let e = check(&key, &everything).expect_err("/0 under a real key");
        assert!(e.contains("names block 0.0.0.0/0"), "{e}");

        let outside = lease("default", "10.99.0.0/27");
        let e = check(&k.block("default", &outside.block), &outside).expect_err("outside");
        assert!(e.contains("outside pool default's subnets"), "{e}");

        let host_bits = lease("default", "10.64.0.33/27");
        let e = check(&key, &host_bits).expect_err("host bits");
        assert!(e.contains("host bits"), "{e}");

        let smaller = lease("default", "10.64.0.48/28");
        let e = check(&k.block("default", &smaller.block), &smaller).expect_err("size");
        assert!(e.contains("is a /28"), "{e}");

        let v6 = lease("default", "fd00::/123");
        let e = check(&k.block("default", &v6.block), &v6).expect_err("family");
        assert!(e.contains("ipv6") && e.contains("ipv4"), "{e}");

        let bad_node = BlockLease {
            node: "no spaces".into(),
            ..good.clone()
        };
        assert!(check(&key, &bad_node)
            .expect_err("node")
            .contains("node name"));

        let no_epoch = BlockLease {
            epoch: 0,
            ..good.clone()
        };
        assert!(check(&key, &no_epoch).expect_err("epoch").contains("epoch"));

        let e = validate_lease(&k, &key, &good, None).expect_err("no pool");
        assert!(e.contains("does not exist"), "{e}");
        let wrong = Pool {
            name: "other".into(),
            ..p.clone()
        };
        assert!(validate_lease(&k, &key, &good, Some(&wrong)).is_err());

        for stray in [
            "/coil/blocks/default/zz",
            "/coil/blocks/zz",
            "/other/blocks/default/0a400020",
        ] {
            assert!(check(stray, &good).is_err(), "{stray}");
        }
        // Upper-case hex is not the key coil builds.
        assert!(check("/coil/blocks/default/0A400020", &good).is_err());
    }

    #[test]
    fn block_keys_parse_back_only_when_canonical() {
        let k = keys();
        let p = pool();
        let b = net("10.64.1.0/27");
        assert_eq!(k.block_of_key(&p, &k.block("default", &b)), Some(b));
        for key in [
            "/coil/blocks/default/0a400101",   // misaligned
            "/coil/blocks/default/0A400100",   // not canonical
            "/coil/blocks/default/0a990000",   // outside the pool
            "/coil/blocks/other/0a400100",     // another pool
            "/coil/blocks/default/0a400100/x", // deeper
            "/coil/blocks/default/zz",
        ] {
            assert_eq!(k.block_of_key(&p, key), None, "{key}");
        }
        assert_eq!(
            k.split_block_key("/coil/blocks/default/zz"),
            Some(("default", "zz"))
        );
        assert_eq!(k.split_block_key("/coil/blocks/zz"), None);
    }

    #[test]
    fn pool_entries_are_checked_like_new_pools() {
        let k = keys();
        let p = pool();
        assert_eq!(validate_pool_entry(&k, "/coil/pools/default", &p), Ok(()));
        assert!(validate_pool_entry(&k, "/coil/pools/other", &p)
            .expect_err("name")
            .contains("names pool"));
        let bad = |f: &dyn Fn(&mut Pool)| {
            let mut q = pool();
            f(&mut q);
            validate_pool_entry(&k, "/coil/pools/default", &q)
        };
        assert!(bad(&|q| q.subnets.clear()).is_err());
        assert!(bad(&|q| q.subnets = vec![net("10.64.0.1/16")]).is_err());
        assert!(bad(&|q| q.subnets.push(net("10.64.4.0/24"))).is_err());
        assert!(bad(&|q| q.block_size = 30).is_err());
        assert!(bad(&|q| q.family = Family::Ipv6).is_err());
        assert!(bad(&|q| q.subnets = vec![net("0.0.0.0/0")]).is_err());
    }

    #[test]
    fn node_address_and_subnet_entries_match_their_keys() {
        let k = keys();
        let rec = NodeRecord {
            node: "node-1".into(),
            boot_id: "b".into(),
            started_unix: 1,
            version: "0".into(),
        };
        assert_eq!(validate_node_entry(&k, "/coil/nodes/node-1", &rec), Ok(()));
        assert!(validate_node_entry(&k, "/coil/nodes/node-2", &rec).is_err());

        let a = AddressRecord {
            network: "k8s".into(),
            address: "10.64.0.33".parse().expect("ip"),
            pool: "default".into(),
            block: net("10.64.0.32/27"),
            node: "node-1".into(),
            container_id: "c".into(),
            ifname: "eth0".into(),
            pod_namespace: String::new(),
            pod_name: String::new(),
        };
        let key = k.address(a.address);
        assert_eq!(validate_address_entry(&k, &key, &a), Ok(()));
        let moved = k.address("10.64.0.34".parse().expect("ip"));
        assert!(validate_address_entry(&k, &moved, &a)
            .expect_err("key")
            .contains("names address"));
        let outside = AddressRecord {
            block: net("10.64.0.64/27"),
            ..a.clone()
        };
        assert!(validate_address_entry(&k, &key, &outside)
            .expect_err("block")
            .contains("outside its block"));
        assert!(validate_address_entry(&k, "/coil/addresses/4/0A400021", &a).is_err());
        assert!(validate_address_entry(&k, "/coil/addresses/6/0a400021", &a).is_err());

        let s = SubnetRecord {
            subnet: net("10.64.0.0/16"),
            pool: "default".into(),
        };
        let key = k.subnet(&s.subnet);
        assert_eq!(k.subnet_of_key(&key), Some(s.subnet));
        assert_eq!(validate_subnet_entry(&k, &key, &s), Ok(()));
        assert!(validate_subnet_entry(&k, &k.subnet(&net("10.64.0.0/17")), &s).is_err());
        assert_eq!(k.subnet_of_key("/coil/subnets/4/0a400000/16"), None);
        assert_eq!(k.subnet_of_key("/coil/subnets/4/0a400001/016"), None);
    }
}
