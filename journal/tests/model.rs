//! Property test: random operation sequences against a BTreeMap model, with
//! clean reopens, crash reopens (no final checkpoint) and checkpoints in
//! between. After every step the journal must read back exactly the model.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;

use coil_journal::*;
use common::*;
use ipnet::IpNet;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    PutAttachment(u32, u32),
    DeleteAttachment(u32),
    PutLease(u32, u64),
    DeleteLease(u32),
    PutAddress(u32, u32, u32),
    DeleteAddress(u32, u32),
    PutIntent(u64, bool),
    DeleteIntent(u64),
    /// Several of the above committed as one batch.
    Batch(Vec<Op>),
    Reopen,
    Crash,
    Checkpoint,
}

fn simple_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u32..24, 0u32..6).prop_map(|(i, v)| Op::PutAttachment(i, v)),
        2 => (0u32..24).prop_map(Op::DeleteAttachment),
        2 => (0u32..10, 0u64..5).prop_map(|(i, e)| Op::PutLease(i, e)),
        1 => (0u32..10).prop_map(Op::DeleteLease),
        3 => (0u32..4, 0u32..16, 0u32..24).prop_map(|(b, o, k)| Op::PutAddress(b, o, k)),
        2 => (0u32..4, 0u32..16).prop_map(|(b, o)| Op::DeleteAddress(b, o)),
        2 => (1u64..30, any::<bool>()).prop_map(|(i, d)| Op::PutIntent(i, d)),
        1 => (1u64..30).prop_map(Op::DeleteIntent),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => simple_op(),
        2 => prop::collection::vec(simple_op(), 1..6).prop_map(Op::Batch),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
        1 => Just(Op::Checkpoint),
    ]
}

#[derive(Default, Debug)]
struct Model {
    attachments: BTreeMap<AttachmentKey, Attachment>,
    leases: BTreeMap<Vec<u8>, BlockLease>,
    addresses: BTreeMap<IpAddr, AddressEntry>,
    intents: BTreeMap<u64, Intent>,
}

fn lease_sort_key(b: IpNet) -> Vec<u8> {
    // Same order as the journal's key encoding: family, address, prefix.
    let mut k = match b.network() {
        IpAddr::V4(a) => {
            let mut v = vec![4];
            v.extend_from_slice(&a.octets());
            v
        }
        IpAddr::V6(a) => {
            let mut v = vec![6];
            v.extend_from_slice(&a.octets());
            v
        }
    };
    k.push(b.prefix_len());
    k
}

fn stage(op: &Op, b: &mut Batch, m: &mut Model) {
    match op {
        Op::PutAttachment(i, v) => {
            let a = attachment(*i, *v);
            b.put_attachment(&a);
            m.attachments.insert(a.key.clone(), a);
        }
        Op::DeleteAttachment(i) => {
            b.delete_attachment(&key(*i));
            m.attachments.remove(&key(*i));
        }
        Op::PutLease(i, e) => {
            let l = lease(*i, *e);
            b.put_lease(&l);
            m.leases.insert(lease_sort_key(l.block), l);
        }
        Op::DeleteLease(i) => {
            let l = lease(*i, 0);
            b.delete_lease(l.block);
            m.leases.remove(&lease_sort_key(l.block));
        }
        Op::PutAddress(bi, off, k) => {
            let blk = block(*bi);
            let a = addr_in(blk, *off);
            let e = AddressEntry {
                attachment: key(*k),
                block: blk,
            };
            b.put_address(a, &e);
            m.addresses.insert(a, e);
        }
        Op::DeleteAddress(bi, off) => {
            let a = addr_in(block(*bi), *off);
            b.delete_address(a);
            m.addresses.remove(&a);
        }
        Op::PutIntent(id, done) => {
            let i = intent(*id, *done);
            b.put_intent(&i);
            m.intents.insert(*id, i);
        }
        Op::DeleteIntent(id) => {
            b.delete_intent(*id);
            m.intents.remove(id);
        }
        Op::Batch(_) | Op::Reopen | Op::Crash | Op::Checkpoint => {}
    }
}

fn check(j: &Journal, m: &Model) -> Result<(), TestCaseError> {
    let atts = j.attachments().expect("attachments decode");
    prop_assert_eq!(&atts, &m.attachments.values().cloned().collect::<Vec<_>>());
    let leases = j.leases().expect("leases decode");
    prop_assert_eq!(&leases, &m.leases.values().cloned().collect::<Vec<_>>());
    let addrs = j.addresses().expect("addresses decode");
    prop_assert_eq!(
        &addrs,
        &m.addresses
            .iter()
            .map(|(a, e)| (*a, e.clone()))
            .collect::<Vec<_>>()
    );
    let intents = j.intents().expect("intents decode");
    prop_assert_eq!(&intents, &m.intents.values().cloned().collect::<Vec<_>>());
    // Point reads agree with scans, and block range scans select exactly the
    // block's addresses.
    for a in &atts {
        prop_assert_eq!(j.attachment(&a.key).expect("read"), Some(a.clone()));
    }
    for bi in 0..4 {
        let blk = block(bi);
        let want: Vec<_> = m
            .addresses
            .iter()
            .filter(|(a, _)| blk.contains(*a))
            .map(|(a, e)| (*a, e.clone()))
            .collect();
        prop_assert_eq!(j.addresses_in(blk).expect("range"), want);
    }
    Ok(())
}

fn opts() -> JournalOptions {
    JournalOptions {
        // Tiny, so background checkpoints and segment rotation run often.
        checkpoint_bytes: 2048,
        ..Default::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, .. ProptestConfig::default() })]

    #[test]
    fn journal_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = Some(Journal::open_with(dir.path(), opts()).expect("open"));
        let mut m = Model::default();
        let mut last_seq = 0;
        for op in &ops {
            match op {
                Op::Reopen => {
                    j.take().expect("open journal").close().expect("close");
                    j = Some(Journal::open_with(dir.path(), opts()).expect("reopen"));
                }
                Op::Crash => {
                    j.take().expect("open journal").abandon();
                    let nj = Journal::open_with(dir.path(), opts()).expect("reopen after crash");
                    prop_assert_eq!(nj.open_report().last_seq, last_seq);
                    prop_assert!(nj.open_report().torn_tails.is_empty());
                    j = Some(nj);
                }
                Op::Checkpoint => j.as_ref().expect("open").checkpoint().expect("checkpoint"),
                Op::Batch(ops) => {
                    let mut b = Batch::new();
                    for o in ops {
                        stage(o, &mut b, &mut m);
                    }
                    let seq = j.as_ref().expect("open").commit(b).expect("commit").seq;
                    prop_assert!(seq >= last_seq);
                    last_seq = seq;
                }
                simple => {
                    let mut b = Batch::new();
                    stage(simple, &mut b, &mut m);
                    let seq = j.as_ref().expect("open").commit(b).expect("commit").seq;
                    prop_assert!(seq >= last_seq);
                    last_seq = seq;
                }
            }
            check(j.as_ref().expect("open"), &m)?;
        }
        let j = j.expect("open");
        let report = j.verify();
        prop_assert!(report.corrupt.is_empty(), "corrupt: {:?}", report.corrupt);
    }
}

#[test]
fn sequence_numbers_and_intent_ids_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = Journal::open(dir.path()).expect("open");
    assert!(j.open_report().created);
    let id = j.next_intent_id();
    let mut b = Batch::new();
    b.put_intent(&intent(id, false));
    let s1 = j.commit(b).expect("commit").seq;
    j.abandon();
    let j = Journal::open(dir.path()).expect("reopen");
    assert!(!j.open_report().created);
    assert_eq!(j.open_report().last_seq, s1);
    assert_eq!(j.open_report().replayed_batches, 1);
    assert!(j.next_intent_id() > id, "intent ids must never be reused");
    let mut b = Batch::new();
    b.put_lease(&lease(1, 1));
    assert_eq!(j.commit(b).expect("commit").seq, s1 + 1);
    assert_eq!(j.pending_intents().expect("intents").len(), 1);
}

#[test]
fn concurrent_committers_all_land_and_share_syncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = std::sync::Arc::new(Journal::open(dir.path()).expect("open"));
    let threads: Vec<_> = (0..8u32)
        .map(|t| {
            let j = j.clone();
            std::thread::spawn(move || {
                let mut seqs = vec![];
                for i in 0..50u32 {
                    let mut b = Batch::new();
                    b.put_attachment(&attachment(t * 1000 + i, i));
                    seqs.push(j.commit(b).expect("commit").seq);
                }
                seqs
            })
        })
        .collect();
    let mut all: Vec<u64> = threads
        .into_iter()
        .flat_map(|h| h.join().expect("thread"))
        .collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 400, "every commit gets its own sequence number");
    assert_eq!(j.attachments().expect("read").len(), 400);
}

#[test]
fn invalid_records_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = Journal::open(dir.path()).expect("open");
    let mut a = attachment(1, 1);
    a.key.ifname = "has\0nul".into();
    let mut b = Batch::new();
    b.put_lease(&lease(2, 1)).put_attachment(&a);
    let err = j.commit(b).expect_err("invalid key refused");
    assert!(matches!(err, JournalError::Invalid(_)), "{err}");
    assert!(
        j.leases().expect("read").is_empty(),
        "the valid part must not land either"
    );

    let mut a = attachment(1, 1);
    a.addresses[0].addr = "192.168.0.1".parse().expect("addr");
    let mut b = Batch::new();
    b.put_attachment(&a);
    assert!(matches!(j.commit(b), Err(JournalError::Invalid(_))));
    assert_eq!(j.stats().last_seq, 0);
}
