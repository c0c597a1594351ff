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
        pool: if i % 2 == 0 { "default" } else { "dmz" }.into(),
        block: if i % 3 == 0 { v6block(i) } else { block(i) },
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
