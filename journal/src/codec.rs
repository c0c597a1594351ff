//! Persisted (format 1) types, key encodings, and the conversions between the
//! public model and what is written to disk.
//!
//! Only this module knows bincode. Every value goes through [`crate::envelope`]
//! and every decoded value is validated (address families, prefix lengths,
//! name characters) before it becomes a model type.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::envelope::{self, DecodeError, Kind};
use crate::model::*;

/// bincode's standard configuration, with a decode limit equal to the
/// envelope's payload limit, so no length prefix in a damaged payload can
/// make the decoder allocate more than a payload could hold.
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ envelope::MAX_PAYLOAD }>()
}

/// Encodes a persisted value into an envelope of `kind`.
pub(crate) fn encode<T: Serialize>(kind: Kind, value: &T) -> Vec<u8> {
    // Encoding plain structs into a Vec cannot fail; an empty payload would
    // be caught by decode as a payload error, never silently accepted.
    let payload = bincode::serde::encode_to_vec(value, config()).unwrap_or_default();
    envelope::seal(kind, &payload)
}

/// Decodes an envelope of `kind` into a persisted value, refusing trailing bytes.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], kind: Kind) -> Result<T, DecodeError> {
    let env = envelope::open_kind(bytes, kind)?;
    decode_payload(&env)
}

/// Decodes a record whose layout changed in format 2 (the attachment key
/// gained the network name): format-1 envelopes decode as `Old` and are
/// converted, newer ones as `New`.
fn decode_keyed<Old: DeserializeOwned, New: DeserializeOwned, R>(
    bytes: &[u8],
    kind: Kind,
    old: impl FnOnce(Old) -> Result<R, DecodeError>,
    new: impl FnOnce(New) -> Result<R, DecodeError>,
) -> Result<R, DecodeError> {
    let env = envelope::open_kind(bytes, kind)?;
    if env.version < 2 {
        old(decode_payload(&env)?)
    } else {
        new(decode_payload(&env)?)
    }
}

fn decode_payload<T: DeserializeOwned>(env: &envelope::Envelope<'_>) -> Result<T, DecodeError> {
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(env.payload, config())
        .map_err(|e| DecodeError::Payload(e.to_string()))?;
    if used != env.payload.len() {
        return Err(DecodeError::Payload(format!(
            "{} unused payload bytes",
            env.payload.len() - used
        )));
    }
    Ok(value)
}

fn bad(msg: impl Into<String>) -> DecodeError {
    DecodeError::Payload(msg.into())
}

// ---------------------------------------------------------------- v1 types

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct AddrV1 {
    family: u8,
    bytes: [u8; 16],
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct NetV1 {
    addr: AddrV1,
    prefix: u8,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeMetaV1 {
    node_name: String,
    boot_id: String,
    cluster_id: String,
    created_unix: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseV1 {
    pool: String,
    block: NetV1,
    epoch: u64,
    state: u8,
    alloc_cursor: u32,
}

/// The attachment key of format 1: no network name.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyV1 {
    container_id: String,
    ifname: String,
}

/// The attachment key of format 2: the CNI triple.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyV2 {
    network: String,
    container_id: String,
    ifname: String,
}

/// A persisted attachment key of either format.
pub(crate) trait PersistedKey: Serialize + DeserializeOwned {
    fn to_model(&self) -> Result<AttachmentKey, DecodeError>;
}

impl PersistedKey for KeyV1 {
    fn to_model(&self) -> Result<AttachmentKey, DecodeError> {
        validate_key("", &self.container_id, &self.ifname).map_err(bad)?;
        Ok(AttachmentKey::new(
            "",
            self.container_id.clone(),
            self.ifname.clone(),
        ))
    }
}

impl PersistedKey for KeyV2 {
    fn to_model(&self) -> Result<AttachmentKey, DecodeError> {
        // An empty network is a format-1 attachment rewritten by this
        // build (a DEL marking it Releasing): it stays legacy.
        validate_key(&self.network, &self.container_id, &self.ifname).map_err(bad)?;
        Ok(AttachmentKey::new(
            self.network.clone(),
            self.container_id.clone(),
            self.ifname.clone(),
        ))
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct AssignedV1 {
    addr: AddrV1,
    block: NetV1,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct AttachmentV1<K> {
    key: K,
    netns: String,
    pod_namespace: String,
    pod_name: String,
    pool: String,
    addresses: Vec<AssignedV1>,
    host_veth: String,
    state: u8,
    boot_id: String,
    created_unix: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) enum IntentOpV1<K> {
    AcquireBlock { pool: String, block: Option<NetV1> },
    ReleaseBlock { pool: String, block: NetV1 },
    Wire { key: K },
    Unwire { key: K },
    ExportBlock { block: NetV1 },
    WithdrawBlock { block: NetV1 },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) enum IntentStateV1 {
    Pending,
    Done,
    Aborted(String),
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct IntentV1<K> {
    id: u64,
    op: IntentOpV1<K>,
    state: IntentStateV1,
    created_unix: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct AddressV1<K> {
    attachment: K,
    block: NetV1,
}

/// One operation inside a WAL batch: a put (value = a sealed envelope) or a
/// delete of `key` in `tree`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct WalOpV1 {
    pub tree: u8,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct WalBatchV1 {
    pub seq: u64,
    pub ops: Vec<WalOpV1>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentHeaderV1 {
    pub format_version: u32,
    pub first_seq: u64,
}

// ------------------------------------------------------------ conversions

fn addr_to_v1(a: IpAddr) -> AddrV1 {
    match a {
        IpAddr::V4(v4) => {
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            AddrV1 { family: 4, bytes }
        }
        IpAddr::V6(v6) => AddrV1 {
            family: 6,
            bytes: v6.octets(),
        },
    }
}

fn addr_from_v1(a: &AddrV1) -> Result<IpAddr, DecodeError> {
    match a.family {
        4 => {
            if a.bytes[4..].iter().any(|b| *b != 0) {
                return Err(bad("IPv4 address with bytes beyond the fourth"));
            }
            Ok(IpAddr::V4(Ipv4Addr::new(
                a.bytes[0], a.bytes[1], a.bytes[2], a.bytes[3],
            )))
        }
        6 => Ok(IpAddr::V6(Ipv6Addr::from(a.bytes))),
        f => Err(bad(format!("address family {f}"))),
    }
}

fn net_to_v1(n: IpNet) -> NetV1 {
    NetV1 {
        addr: addr_to_v1(n.addr()),
        prefix: n.prefix_len(),
    }
}

fn net_from_v1(n: &NetV1) -> Result<IpNet, DecodeError> {
    match addr_from_v1(&n.addr)? {
        IpAddr::V4(a) => Ipv4Net::new(a, n.prefix)
            .map(IpNet::V4)
            .map_err(|_| bad(format!("IPv4 prefix length {}", n.prefix))),
        IpAddr::V6(a) => Ipv6Net::new(a, n.prefix)
            .map(IpNet::V6)
            .map_err(|_| bad(format!("IPv6 prefix length {}", n.prefix))),
    }
}

fn key_to_v2(k: &AttachmentKey) -> KeyV2 {
    KeyV2 {
        network: k.network.clone(),
        container_id: k.container_id.clone(),
        ifname: k.ifname.clone(),
    }
}

/// Longest network name (the CNI configuration's `name`) in a key.
pub const MAX_NETWORK_NAME: usize = 128;
/// Longest container id in a key.
pub const MAX_CONTAINER_ID: usize = 256;

/// Is `s` a network name as the CNI spec defines it (an alphanumeric
/// character, then alphanumerics, '_', '.' or '-'), at most
/// [`MAX_NETWORK_NAME`] bytes?
pub fn valid_network_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NETWORK_NAME
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Checks the parts of an attachment key: a valid network name (or empty,
/// for a format-1 record), a container id and an interface name that are
/// non-empty, bounded and free of NUL (the key encoding's separator).
pub(crate) fn validate_key(network: &str, container_id: &str, ifname: &str) -> Result<(), String> {
    if !network.is_empty() && !valid_network_name(network) {
        return Err(format!(
            "network name must be 1-{MAX_NETWORK_NAME} bytes of [A-Za-z0-9_.-] starting \
             with a letter or digit, got {network:?}"
        ));
    }
    if container_id.is_empty()
        || container_id.len() > MAX_CONTAINER_ID
        || container_id.contains('\0')
    {
        return Err(format!(
            "container id must be 1-{MAX_CONTAINER_ID} bytes without NUL, got {container_id:?}"
        ));
    }
    if ifname.is_empty() || ifname.len() > 15 || ifname.contains('\0') || ifname.contains('/') {
        return Err(format!(
            "interface name must be 1-15 bytes without NUL or '/', got {ifname:?}"
        ));
    }
    Ok(())
}

fn lease_state_to_u8(s: LeaseState) -> u8 {
    match s {
        LeaseState::Acquiring => 1,
        LeaseState::Leased => 2,
        LeaseState::Releasing => 3,
        LeaseState::Quarantined => 4,
    }
}

fn lease_state_from_u8(b: u8) -> Result<LeaseState, DecodeError> {
    Ok(match b {
        1 => LeaseState::Acquiring,
        2 => LeaseState::Leased,
        3 => LeaseState::Releasing,
        4 => LeaseState::Quarantined,
        _ => return Err(bad(format!("lease state {b}"))),
    })
}

fn att_state_to_u8(s: AttachmentState) -> u8 {
    match s {
        AttachmentState::Reserved => 1,
        AttachmentState::Wired => 2,
        AttachmentState::Releasing => 3,
    }
}

fn att_state_from_u8(b: u8) -> Result<AttachmentState, DecodeError> {
    Ok(match b {
        1 => AttachmentState::Reserved,
        2 => AttachmentState::Wired,
        3 => AttachmentState::Releasing,
        _ => return Err(bad(format!("attachment state {b}"))),
    })
}

pub(crate) fn encode_node_meta(m: &NodeMeta) -> Vec<u8> {
    encode(
        Kind::NodeMeta,
        &NodeMetaV1 {
            node_name: m.node_name.clone(),
            boot_id: m.boot_id.clone(),
            cluster_id: m.cluster_id.clone(),
            created_unix: m.created_unix,
        },
    )
}

pub(crate) fn decode_node_meta(b: &[u8]) -> Result<NodeMeta, DecodeError> {
    let v: NodeMetaV1 = decode(b, Kind::NodeMeta)?;
    Ok(NodeMeta {
        node_name: v.node_name,
        boot_id: v.boot_id,
        cluster_id: v.cluster_id,
        created_unix: v.created_unix,
    })
}

pub(crate) fn encode_counter(v: u64) -> Vec<u8> {
    encode(Kind::Counter, &v)
}

pub(crate) fn decode_counter(b: &[u8]) -> Result<u64, DecodeError> {
    decode(b, Kind::Counter)
}

/// The CHECKPOINT file: the format version of the whole journal and the
/// sequence number up to which sled's files are known to be durable.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CheckpointV1 {
    pub format_version: u32,
    pub seq: u64,
}

pub(crate) fn encode_checkpoint(seq: u64) -> Vec<u8> {
    encode(
        Kind::Format,
        &CheckpointV1 {
            format_version: u32::from(envelope::FORMAT_VERSION),
            seq,
        },
    )
}

/// Decodes the CHECKPOINT file. A file written by a newer coil is reported
/// as [`DecodeError::NewerVersion`] before its payload is looked at, so a
/// newer journal is refused as newer, never misread as corrupt.
pub(crate) fn decode_checkpoint(b: &[u8]) -> Result<CheckpointV1, DecodeError> {
    let c: CheckpointV1 = decode(b, Kind::Format)?;
    if c.format_version > u32::from(envelope::FORMAT_VERSION) {
        return Err(DecodeError::NewerVersion(
            u16::try_from(c.format_version).unwrap_or(u16::MAX),
        ));
    }
    Ok(c)
}

pub(crate) fn encode_lease(l: &BlockLease) -> Vec<u8> {
    encode(
        Kind::Lease,
        &LeaseV1 {
            pool: l.pool.clone(),
            block: net_to_v1(l.block),
            epoch: l.epoch,
            state: lease_state_to_u8(l.state),
            alloc_cursor: l.alloc_cursor,
        },
    )
}

pub(crate) fn decode_lease(b: &[u8]) -> Result<BlockLease, DecodeError> {
    let v: LeaseV1 = decode(b, Kind::Lease)?;
    let block = net_from_v1(&v.block)?;
    if block != block.trunc() {
        return Err(bad(format!("block {block} has host bits set")));
    }
    Ok(BlockLease {
        pool: v.pool,
        block,
        epoch: v.epoch,
        state: lease_state_from_u8(v.state)?,
        alloc_cursor: v.alloc_cursor,
    })
}

/// The persisted form of `a` with `key` in the layout of its format.
fn persisted_attachment<K>(a: &Attachment, key: K) -> AttachmentV1<K> {
    AttachmentV1 {
        key,
        netns: a.netns.clone(),
        pod_namespace: a.pod_namespace.clone(),
        pod_name: a.pod_name.clone(),
        pool: a.pool.clone(),
        addresses: a
            .addresses
            .iter()
            .map(|x| AssignedV1 {
                addr: addr_to_v1(x.addr),
                block: net_to_v1(x.block),
            })
            .collect(),
        host_veth: a.host_veth.clone(),
        state: att_state_to_u8(a.state),
        boot_id: a.boot_id.clone(),
        created_unix: a.created_unix,
    }
}

pub(crate) fn encode_attachment(a: &Attachment) -> Vec<u8> {
    encode(
        Kind::Attachment,
        &persisted_attachment(a, key_to_v2(&a.key)),
    )
}

pub(crate) fn decode_attachment(b: &[u8]) -> Result<Attachment, DecodeError> {
    decode_keyed(
        b,
        Kind::Attachment,
        |v: AttachmentV1<KeyV1>| attachment_from(v),
        |v: AttachmentV1<KeyV2>| attachment_from(v),
    )
}

fn attachment_from<K: PersistedKey>(v: AttachmentV1<K>) -> Result<Attachment, DecodeError> {
    let mut addresses = Vec::with_capacity(v.addresses.len());
    for x in &v.addresses {
        let addr = addr_from_v1(&x.addr)?;
        let block = net_from_v1(&x.block)?;
        if !block.contains(&addr) {
            return Err(bad(format!("address {addr} outside its block {block}")));
        }
        addresses.push(AssignedAddress { addr, block });
    }
    Ok(Attachment {
        key: v.key.to_model()?,
        netns: v.netns,
        pod_namespace: v.pod_namespace,
        pod_name: v.pod_name,
        pool: v.pool,
        addresses,
        host_veth: v.host_veth,
        state: att_state_from_u8(v.state)?,
        boot_id: v.boot_id,
        created_unix: v.created_unix,
    })
}

pub(crate) fn encode_intent(i: &Intent) -> Vec<u8> {
    let op = match &i.op {
        IntentOp::AcquireBlock { pool, block } => IntentOpV1::AcquireBlock {
            pool: pool.clone(),
            block: block.map(net_to_v1),
        },
        IntentOp::ReleaseBlock { pool, block } => IntentOpV1::ReleaseBlock {
            pool: pool.clone(),
            block: net_to_v1(*block),
        },
        IntentOp::Wire { key } => IntentOpV1::Wire {
            key: key_to_v2(key),
        },
        IntentOp::Unwire { key } => IntentOpV1::Unwire {
            key: key_to_v2(key),
        },
        IntentOp::ExportBlock { block } => IntentOpV1::ExportBlock {
            block: net_to_v1(*block),
        },
        IntentOp::WithdrawBlock { block } => IntentOpV1::WithdrawBlock {
            block: net_to_v1(*block),
        },
    };
    let state = match &i.state {
        IntentState::Pending => IntentStateV1::Pending,
        IntentState::Done => IntentStateV1::Done,
        IntentState::Aborted { reason } => IntentStateV1::Aborted(reason.clone()),
    };
    encode(
        Kind::Intent,
        &IntentV1 {
            id: i.id,
            op,
            state,
            created_unix: i.created_unix,
        },
    )
}

pub(crate) fn decode_intent(b: &[u8]) -> Result<Intent, DecodeError> {
    decode_keyed(
        b,
        Kind::Intent,
        |v: IntentV1<KeyV1>| intent_from(v),
        |v: IntentV1<KeyV2>| intent_from(v),
    )
}

fn intent_from<K: PersistedKey>(v: IntentV1<K>) -> Result<Intent, DecodeError> {
    let op = match &v.op {
        IntentOpV1::AcquireBlock { pool, block } => IntentOp::AcquireBlock {
            pool: pool.clone(),
            block: block.as_ref().map(net_from_v1).transpose()?,
        },
        IntentOpV1::ReleaseBlock { pool, block } => IntentOp::ReleaseBlock {
            pool: pool.clone(),
            block: net_from_v1(block)?,
        },
        IntentOpV1::Wire { key } => IntentOp::Wire {
            key: key.to_model()?,
        },
        IntentOpV1::Unwire { key } => IntentOp::Unwire {
            key: key.to_model()?,
        },
        IntentOpV1::ExportBlock { block } => IntentOp::ExportBlock {
            block: net_from_v1(block)?,
        },
        IntentOpV1::WithdrawBlock { block } => IntentOp::WithdrawBlock {
            block: net_from_v1(block)?,
        },
    };
    let state = match v.state {
        IntentStateV1::Pending => IntentState::Pending,
        IntentStateV1::Done => IntentState::Done,
        IntentStateV1::Aborted(reason) => IntentState::Aborted { reason },
    };
    Ok(Intent {
        id: v.id,
        op,
        state,
        created_unix: v.created_unix,
    })
}

pub(crate) fn encode_address(e: &AddressEntry) -> Vec<u8> {
    encode(
        Kind::Address,
        &AddressV1 {
            attachment: key_to_v2(&e.attachment),
            block: net_to_v1(e.block),
        },
    )
}

pub(crate) fn decode_address(b: &[u8]) -> Result<AddressEntry, DecodeError> {
    fn from<K: PersistedKey>(v: AddressV1<K>) -> Result<AddressEntry, DecodeError> {
        Ok(AddressEntry {
            attachment: v.attachment.to_model()?,
            block: net_from_v1(&v.block)?,
        })
    }
    decode_keyed(
        b,
        Kind::Address,
        |v: AddressV1<KeyV1>| from(v),
        |v: AddressV1<KeyV2>| from(v),
    )
}

/// Longest key of the embedded cluster store.
pub(crate) const MAX_STORE_KEY: usize = 1024;
/// Largest value of the embedded cluster store (etcd's default request
/// limit is 1.5 MiB; our values are a few hundred bytes).
pub(crate) const MAX_STORE_VALUE: usize = 1 << 20;

#[derive(Serialize, Deserialize)]
struct StoreEntryV1 {
    value: Vec<u8>,
}

pub(crate) fn validate_store_key(k: &[u8]) -> Result<(), String> {
    if k.is_empty() || k.len() > MAX_STORE_KEY {
        return Err(format!(
            "store key of {} bytes (must be 1..={MAX_STORE_KEY})",
            k.len()
        ));
    }
    Ok(())
}

pub(crate) fn encode_store(value: &[u8]) -> Vec<u8> {
    encode(
        Kind::StoreEntry,
        &StoreEntryV1 {
            value: value.to_vec(),
        },
    )
}

pub(crate) fn decode_store(b: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let v: StoreEntryV1 = decode(b, Kind::StoreEntry)?;
    if v.value.len() > MAX_STORE_VALUE {
        return Err(bad(format!("store value of {} bytes", v.value.len())));
    }
    Ok(v.value)
}

// ------------------------------------------------------------------- keys

/// Sort-preserving key of an address: family byte, then the address bytes
/// (4 for IPv4, 16 for IPv6).
pub(crate) fn addr_key(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v4) => {
            let mut k = vec![4u8];
            k.extend_from_slice(&v4.octets());
            k
        }
        IpAddr::V6(v6) => {
            let mut k = vec![6u8];
            k.extend_from_slice(&v6.octets());
            k
        }
    }
}

pub(crate) fn addr_from_key(k: &[u8]) -> Result<IpAddr, DecodeError> {
    match (k.first(), k.len()) {
        (Some(4), 5) => Ok(IpAddr::V4(Ipv4Addr::new(k[1], k[2], k[3], k[4]))),
        (Some(6), 17) => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&k[1..]);
            Ok(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => Err(bad(format!("malformed address key {k:02x?}"))),
    }
}

/// Sort-preserving key of a block: the address key of its network address
/// followed by the prefix length.
pub(crate) fn net_key(n: IpNet) -> Vec<u8> {
    let mut k = addr_key(n.network());
    k.push(n.prefix_len());
    k
}

pub(crate) fn net_from_key(k: &[u8]) -> Result<IpNet, DecodeError> {
    let (prefix, addr) = k.split_last().ok_or_else(|| bad("empty block key"))?;
    let addr = addr_from_key(addr)?;
    IpNet::new(addr, *prefix).map_err(|_| bad(format!("block key prefix {prefix}")))
}

/// The attachments tree's key: `container id NUL ifname` for a format-1
/// record (no network), `container id NUL ifname NUL network` since
/// format 2. A legacy record keeps its key until it is adopted by a
/// network, so no key is ever rewritten behind a caller's back.
pub(crate) fn attachment_key(k: &AttachmentKey) -> Vec<u8> {
    let mut v = Vec::with_capacity(k.container_id.len() + 2 + k.ifname.len() + k.network.len());
    v.extend_from_slice(k.container_id.as_bytes());
    v.push(0);
    v.extend_from_slice(k.ifname.as_bytes());
    if !k.network.is_empty() {
        v.push(0);
        v.extend_from_slice(k.network.as_bytes());
    }
    v
}

pub(crate) fn attachment_from_key(k: &[u8]) -> Result<AttachmentKey, DecodeError> {
    let mut parts = k.splitn(3, |b| *b == 0);
    let text = |p: Option<&[u8]>| -> Result<String, DecodeError> {
        let p = p.ok_or_else(|| bad("attachment key without separator"))?;
        std::str::from_utf8(p)
            .map(String::from)
            .map_err(|e| bad(e.to_string()))
    };
    let cid = text(parts.next())?;
    let ifn = text(parts.next())?;
    let net = match parts.next() {
        Some(n) => {
            let n = text(Some(n))?;
            if n.is_empty() {
                return Err(bad("attachment key with an empty network name"));
            }
            n
        }
        None => String::new(),
    };
    validate_key(&net, &cid, &ifn).map_err(bad)?;
    Ok(AttachmentKey::new(net, cid, ifn))
}

/// Renders a raw key of `tree` for humans (error messages, dumps).
pub(crate) fn show_key(tree: crate::Tree, k: &[u8]) -> String {
    use crate::Tree;
    let body = match tree {
        Tree::Meta => String::from_utf8_lossy(k).into_owned(),
        Tree::Leases => net_from_key(k)
            .map(|n| n.to_string())
            .unwrap_or_else(|_| format!("{k:02x?}")),
        Tree::Attachments => attachment_from_key(k)
            .map(|a| a.to_string())
            .unwrap_or_else(|_| String::from_utf8_lossy(k).into_owned()),
        Tree::Intents => <[u8; 8]>::try_from(k)
            .map(|b| u64::from_be_bytes(b).to_string())
            .unwrap_or_else(|_| format!("{k:02x?}")),
        Tree::Addresses => addr_from_key(k)
            .map(|a| a.to_string())
            .unwrap_or_else(|_| format!("{k:02x?}")),
        Tree::Store => String::from_utf8_lossy(k).into_owned(),
    };
    format!("{}/{}", tree.name(), body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_attachment() -> Attachment {
        Attachment {
            key: AttachmentKey::new("k8s", "abc123", "eth0"),
            netns: "/run/netns/p1".into(),
            pod_namespace: "default".into(),
            pod_name: "p1".into(),
            pool: "default".into(),
            addresses: vec![
                AssignedAddress {
                    addr: "10.0.1.5".parse().expect("addr"),
                    block: "10.0.1.0/27".parse().expect("net"),
                },
                AssignedAddress {
                    addr: "fd00::5".parse().expect("addr"),
                    block: "fd00::/122".parse().expect("net"),
                },
            ],
            host_veth: "veth1234".into(),
            state: AttachmentState::Wired,
            boot_id: "b".into(),
            created_unix: 7,
        }
    }

    /// Seals `value` as format 1 wrote it.
    fn format1<T: Serialize>(kind: Kind, value: &T) -> Vec<u8> {
        let payload = bincode::serde::encode_to_vec(value, config()).expect("encode");
        envelope::seal_at(kind, 1, &payload)
    }

    #[test]
    fn format1_records_decode_as_legacy_keys() {
        let a = sample_attachment();
        let old_key = KeyV1 {
            container_id: "abc123".into(),
            ifname: "eth0".into(),
        };
        let v1 = persisted_attachment(&a, old_key.clone());
        let got = decode_attachment(&format1(Kind::Attachment, &v1)).expect("format 1");
        assert_eq!(got.key, AttachmentKey::new("", "abc123", "eth0"));
        assert!(got.key.is_legacy());
        assert_eq!(got.addresses, a.addresses);
        // The same bytes read as format 2 are refused, not misread.
        let payload = bincode::serde::encode_to_vec(&v1, config()).expect("encode");
        assert!(decode_attachment(&envelope::seal_at(Kind::Attachment, 2, &payload)).is_err());

        let i = IntentV1 {
            id: 9,
            op: IntentOpV1::Unwire {
                key: old_key.clone(),
            },
            state: IntentStateV1::Pending,
            created_unix: 1,
        };
        let got = decode_intent(&format1(Kind::Intent, &i)).expect("intent");
        assert_eq!(
            got.op,
            IntentOp::Unwire {
                key: AttachmentKey::new("", "abc123", "eth0")
            }
        );
        let e = AddressV1 {
            attachment: old_key,
            block: net_to_v1("10.0.1.0/27".parse().expect("net")),
        };
        let got = decode_address(&format1(Kind::Address, &e)).expect("address");
        assert!(got.attachment.is_legacy());
        // Format-1 tree keys (no network part) parse as legacy keys, and a
        // legacy key encodes back to the same bytes.
        let legacy = attachment_from_key(b"abc123\0eth0").expect("legacy key");
        assert_eq!(legacy, AttachmentKey::new("", "abc123", "eth0"));
        assert_eq!(attachment_key(&legacy), b"abc123\0eth0".to_vec());
        assert!(attachment_from_key(b"abc123\0eth0\0").is_err());
        assert!(attachment_from_key(b"abc123\0eth0\0bad name").is_err());
    }

    #[test]
    fn attachment_round_trip() {
        let a = sample_attachment();
        assert_eq!(decode_attachment(&encode_attachment(&a)), Ok(a));
    }

    #[test]
    fn address_outside_block_is_corrupt() {
        let mut a = sample_attachment();
        a.addresses[0].addr = "10.9.9.9".parse().expect("addr");
        assert!(decode_attachment(&encode_attachment(&a)).is_err());
    }

    #[test]
    fn keys_sort_like_addresses() {
        let a: IpAddr = "10.0.0.255".parse().expect("addr");
        let b: IpAddr = "10.0.1.0".parse().expect("addr");
        assert!(addr_key(a) < addr_key(b));
        assert_eq!(addr_from_key(&addr_key(b)), Ok(b));
        let n: IpNet = "fd00:1::/64".parse().expect("net");
        assert_eq!(net_from_key(&net_key(n)), Ok(n));
        let k = AttachmentKey::new("k8s", "c", "eth1");
        assert_eq!(attachment_from_key(&attachment_key(&k)), Ok(k));
    }

    #[test]
    fn intent_round_trip_all_ops() {
        let key = AttachmentKey::new("k8s", "c", "eth0");
        let block: IpNet = "10.1.0.0/28".parse().expect("net");
        for op in [
            IntentOp::AcquireBlock {
                pool: "p".into(),
                block: None,
            },
            IntentOp::AcquireBlock {
                pool: "p".into(),
                block: Some(block),
            },
            IntentOp::ReleaseBlock {
                pool: "p".into(),
                block,
            },
            IntentOp::Wire { key: key.clone() },
            IntentOp::Unwire { key: key.clone() },
            IntentOp::ExportBlock { block },
            IntentOp::WithdrawBlock { block },
        ] {
            for state in [
                IntentState::Pending,
                IntentState::Done,
                IntentState::Aborted { reason: "r".into() },
            ] {
                let i = Intent {
                    id: 42,
                    op: op.clone(),
                    state,
                    created_unix: 1,
                };
                assert_eq!(decode_intent(&encode_intent(&i)), Ok(i));
            }
        }
    }
}

/// Seals `payload` with a valid checksum as the kind named by `kind`'s
/// byte, then decodes it: reaches the payload decoders with arbitrary bytes,
/// which a checksum-guarded input almost never does.
pub(crate) fn decode_sealed(kind: u8, payload: &[u8]) -> Result<Kind, DecodeError> {
    let kinds = [
        Kind::Format,
        Kind::NodeMeta,
        Kind::Counter,
        Kind::Lease,
        Kind::Attachment,
        Kind::Intent,
        Kind::Address,
        Kind::StoreEntry,
        Kind::WalBatch,
        Kind::WalSegmentHeader,
    ];
    let k = kinds[usize::from(kind) % kinds.len()];
    decode_any(&envelope::seal(k, payload))
}

/// See [`crate::decode_any`].
pub(crate) fn decode_any(b: &[u8]) -> Result<Kind, DecodeError> {
    let kind = envelope::open(b)?.kind;
    match kind {
        Kind::Format => decode_checkpoint(b).map(|_| ()),
        Kind::NodeMeta => decode_node_meta(b).map(|_| ()),
        Kind::Counter => decode_counter(b).map(|_| ()),
        Kind::Lease => decode_lease(b).map(|_| ()),
        Kind::Attachment => decode_attachment(b).map(|_| ()),
        Kind::Intent => decode_intent(b).map(|_| ()),
        Kind::Address => decode_address(b).map(|_| ()),
        Kind::StoreEntry => decode_store(b).map(|_| ()),
        Kind::WalBatch => decode::<WalBatchV1>(b, Kind::WalBatch).map(|_| ()),
        Kind::WalSegmentHeader => decode::<SegmentHeaderV1>(b, Kind::WalSegmentHeader).map(|_| ()),
    }?;
    Ok(kind)
}

#[cfg(test)]
mod fuzz_on_stable {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The fuzz target's body on random inputs and on mutated valid
        /// records, so stable CI exercises it too.
        #[test]
        fn decode_any_never_panics(data in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_any(&data);
        }

        #[test]
        fn sealed_garbage_payloads_never_panic(
            kind in any::<u8>(),
            data in prop::collection::vec(any::<u8>(), 0..512),
        ) {
            let _ = decode_sealed(kind, &data);
        }

        #[test]
        fn mutated_records_never_decode_wrong(
            idx in any::<prop::sample::Index>(),
            x in 1u8..=255,
        ) {
            let a = crate::model::Attachment {
                key: crate::model::AttachmentKey::new("k8s", "abc", "eth0"),
                netns: "/run/netns/x".into(),
                pod_namespace: "ns".into(),
                pod_name: "p".into(),
                pool: "default".into(),
                addresses: vec![],
                host_veth: "veth".into(),
                state: crate::model::AttachmentState::Wired,
                boot_id: "b".into(),
                created_unix: 1,
            };
            let mut b = encode_attachment(&a);
            let i = idx.index(b.len());
            b[i] ^= x;
            // A single corrupted byte is always caught by the checksum.
            prop_assert!(decode_attachment(&b).is_err());
        }
    }
}
