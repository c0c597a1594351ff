//! Record builders shared by the journal's integration tests.
#![allow(dead_code)]

use std::net::IpAddr;

use coil_journal::*;
use ipnet::IpNet;

pub fn block(i: u32) -> IpNet {
    let base = u32::from(std::net::Ipv4Addr::new(10, 0, 0, 0)) + i * 16;
    IpNet::new(IpAddr::V4(base.into()), 28).expect("valid /28")
}

pub fn v6block(i: u32) -> IpNet {
    let base: u128 = 0xfd00_0000_0000_0000_0000_0000_0000_0000 + u128::from(i) * 64;
    IpNet::new(IpAddr::V6(base.into()), 122).expect("valid /122")
}

pub fn addr_in(b: IpNet, off: u32) -> IpAddr {
    match b.network() {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) + off).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) + u128::from(off)).into()),
    }
}

pub fn key(i: u32) -> AttachmentKey {
    AttachmentKey::new("k8s", format!("{i:064x}"), "eth0")
}

pub fn attachment(i: u32, variant: u32) -> Attachment {
    let b = block(i % 8);
    Attachment {
        key: key(i),
        netns: format!("/run/netns/pod{i}"),
        pod_namespace: "default".into(),
        pod_name: format!("pod-{i}-{variant}"),
        pool: "default".into(),
        addresses: vec![AssignedAddress {
            addr: addr_in(b, i % 16),
            block: b,
        }],
        host_veth: format!("veth{i:x}"),
        state: match variant % 3 {
            0 => AttachmentState::Reserved,
            1 => AttachmentState::Wired,
            _ => AttachmentState::Releasing,
        },
        boot_id: "boot-1".into(),
        created_unix: u64::from(variant),
    }
}

pub fn lease(i: u32, epoch: u64) -> BlockLease {
    BlockLease {
        pool: if i.is_multiple_of(2) {
            "default"
        } else {
            "dmz"
        }
        .into(),
        block: if i.is_multiple_of(3) {
            v6block(i)
        } else {
            block(i)
        },
        epoch,
        state: LeaseState::Leased,
        alloc_cursor: i,
    }
}

pub fn intent(id: u64, done: bool) -> Intent {
    Intent {
        id,
        op: IntentOp::Wire {
            key: key(id as u32),
        },
        state: if done {
            IntentState::Done
        } else {
            IntentState::Pending
        },
        created_unix: id,
    }
}

/// Hand-built WAL bytes, for tests that need frames the journal's own API
/// does not produce: format 1 frames as the previous build wrote them, and
/// format 2 frames of a chosen group-commit history. The structs mirror the
/// persisted layouts (bincode 2, standard config) field for field.
pub mod raw {
    use serde::{Deserialize, Serialize};

    pub const KIND_FORMAT: u8 = 1;
    pub const KIND_STORE_ENTRY: u8 = 8;
    pub const KIND_WAL_BATCH: u8 = 16;
    pub const KIND_SEGMENT_HEADER: u8 = 17;
    /// `Tree::Store.id()`.
    pub const TREE_STORE: u8 = 6;

    #[derive(Serialize)]
    pub struct CheckpointV1 {
        pub format_version: u32,
        pub seq: u64,
    }

    #[derive(Serialize)]
    pub struct SegmentHeaderV1 {
        pub format_version: u32,
        pub first_seq: u64,
    }

    #[derive(Serialize, Deserialize)]
    pub struct SegmentHeaderV2 {
        pub format_version: u32,
        pub first_seq: u64,
        pub salt: u64,
    }

    #[derive(Serialize, Clone)]
    pub struct WalOpV1 {
        pub tree: u8,
        pub key: Vec<u8>,
        pub value: Option<Vec<u8>>,
    }

    #[derive(Serialize)]
    pub struct WalBatchV1 {
        pub seq: u64,
        pub ops: Vec<WalOpV1>,
    }

    #[derive(Serialize)]
    pub struct WalBatchV2 {
        pub seq: u64,
        pub salt: u64,
        pub synced_seq: u64,
        pub ops: Vec<WalOpV1>,
    }

    #[derive(Serialize)]
    pub struct StoreEntryV1 {
        pub value: Vec<u8>,
    }

    pub fn payload<T: Serialize>(v: &T) -> Vec<u8> {
        bincode::serde::encode_to_vec(v, bincode::config::standard()).expect("encode")
    }

    /// An envelope of format `version`, with a valid checksum.
    pub fn seal(version: u16, kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = b"CJNL".to_vec();
        out.extend_from_slice(&version.to_le_bytes());
        out.push(kind);
        out.push(0);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&out[..12]);
        h.update(payload);
        out.extend_from_slice(&h.finalize().to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// A put of an embedded-store entry, as format 1 stored it.
    pub fn store_put_v1(key: &str, value: &str) -> WalOpV1 {
        WalOpV1 {
            tree: TREE_STORE,
            key: key.as_bytes().to_vec(),
            value: Some(seal(
                1,
                KIND_STORE_ENTRY,
                &payload(&StoreEntryV1 {
                    value: value.as_bytes().to_vec(),
                }),
            )),
        }
    }

    /// The salt in a format 2 segment's header.
    pub fn segment_salt(segment: &[u8]) -> u64 {
        let len = u32::from_le_bytes(segment[8..12].try_into().expect("4 bytes")) as usize;
        let (h, _): (SegmentHeaderV2, usize) =
            bincode::serde::decode_from_slice(&segment[16..16 + len], bincode::config::standard())
                .expect("format 2 segment header");
        h.salt
    }
}

/// The key of record `i` of thread `t` in run `run` of the kill -9 and
/// power-cut harnesses.
pub fn run_key(run: u32, t: u32, i: u32) -> AttachmentKey {
    AttachmentKey::new("k8s", format!("r{run:04}-t{t}-i{i:06}"), "eth0")
}

/// The record those harnesses commit, fully determined by (run, t, i).
pub fn run_record(run: u32, t: u32, i: u32, pod_namespace: &str) -> Attachment {
    let block: IpNet = "10.128.0.0/16".parse().expect("net");
    let addr = IpAddr::V4((u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0)) + (i % 65536)).into());
    Attachment {
        key: run_key(run, t, i),
        netns: format!("/run/netns/{run}-{t}-{i}"),
        pod_namespace: pod_namespace.into(),
        pod_name: format!("pod-{run}-{t}-{i}"),
        pool: "default".into(),
        addresses: vec![AssignedAddress { addr, block }],
        host_veth: format!("veth{run:x}{t:x}{i:x}"),
        state: AttachmentState::Wired,
        boot_id: format!("boot-{run}"),
        created_unix: u64::from(run) << 32 | u64::from(i),
    }
}
