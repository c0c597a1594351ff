//! A node journal written by journal format 1 (before attachments carried
//! their network) opens under this build and keeps serving its pods.
//! The fixture (tests/fixtures/journal-format1.tar.gz) was made by the
//! previous release's coild: node `fxnode`, boot `boot-fx`, the embedded
//! store with pool default 10.77.0.0/24, two pods wired in the netns
//! coilfx-pod1 and coilfx-pod2 as fxcontainer1/eth0 (10.77.0.216) and
//! fxcontainer2/eth0 (10.77.0.217), killed with SIGKILL so the WAL holds
//! format-1 frames past the checkpoint. Root only.

mod common;

use common::*;

struct Netns(&'static str);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", self.0]);
    }
}

#[test]
fn a_format1_journal_opens_and_its_pods_keep_working() {
    let mut n = Node::new(StoreMode::Embedded, &[]);
    n.stop();
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/journal-format1.tar.gz"
    );
    let jd = n.journal_dir();
    std::fs::remove_dir_all(&jd).expect("remove the fresh journal");
    ok(&[
        "tar",
        "xzf",
        fixture,
        "-C",
        n.dir.path().to_str().expect("utf8"),
    ]);
    n.name = "fxnode".into();
    n.set_boot_id("boot-fx");
    let _guards: Vec<Netns> = ["coilfx-pod1", "coilfx-pod2"]
        .into_iter()
        .map(|p| {
            let _ = sh(&["ip", "netns", "del", p]);
            ok(&["ip", "netns", "add", p]);
            Netns(p)
        })
        .collect();
    // Same boot, netns present, kernel state missing: recovery re-wires
    // both format-1 attachments with their old veth names and addresses.
    n.start();
    let links = n.wait_links(2);
    assert!(links.iter().any(|l| l == "coil7f6dec46473"), "{links:?}");
    let addr = ok(&["ip", "-n", "coilfx-pod2", "-o", "addr", "show", "eth0"]);
    assert!(addr.contains("10.77.0.217/32"), "{addr}");
    // A format-1 attachment answers its network's CHECK ...
    let c = n.call("CHECK", "1.0.0", "coilfx-pod1", "fxcontainer1", "eth0", "");
    assert_eq!(c.code, 0, "{c:?}");
    // ... is never released by a GC (its network is unknown) ...
    let conf = format!(
        r#"{{"cniVersion":"1.1.0","name":"k8s-pod-network","socket":"{}","cni.dev/valid-attachments":[]}}"#,
        n.socket.display()
    );
    let g = cni(&[("CNI_COMMAND", "GC")], conf.as_bytes());
    assert_eq!(g.code, 0, "{g:?}");
    assert_eq!(n.coil_links().len(), 2, "GC took a format-1 attachment");
    // ... and DEL releases it.
    let d = n.call("DEL", "1.0.0", "coilfx-pod1", "fxcontainer1", "eth0", "");
    assert_eq!(d.code, 0, "{d:?}");
    n.wait_links(1);
    // New pods get new-format records and never a held address.
    let p = n.pod();
    let a = n.add(&p, "newpod");
    assert_eq!(a.code, 0, "{a:?}");
    assert_ne!(a.ip(), "10.77.0.217/32");
    n.stop();
    let dump = n.coilctl(&["journal", "dump", "--dir", jd.to_str().expect("utf8")]);
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.status.success(), "{dump:?}");
    assert!(text.contains("(format 1)"), "{text}");
    assert!(text.contains("k8s-pod-network"), "{text}");
    assert!(!text.contains("fxcontainer1"), "{text}");
}
