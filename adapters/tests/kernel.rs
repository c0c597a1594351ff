//! The rtnetlink adapter against the real kernel, in throwaway network
//! namespaces this test creates (root; CI runs it as root).

use std::net::IpAddr;
use std::process::Command;

use coil::kernel::{KernelError, WireSpec};
use coil_adapters::kernel::Kernel;

/// A network namespace that is deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("coilkt-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add")
            .success();
        assert!(ok, "ip netns add {name} (this test needs root)");
        Netns(name)
    }
    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn spec(pod: &Netns, ifname: &str, veth: &str, addr: &str) -> WireSpec {
    WireSpec {
        netns: pod.path(),
        ifname: ifname.into(),
        host_veth: veth.into(),
        alias: format!("coil:{ifname}:kt:{veth}"),
        addresses: vec![addr.parse::<IpAddr>().expect("ip")],
        mtu: 1500,
    }
}

/// A wire that finished after its deadline is retried: the retry must
/// replace the attachment's own complete wiring (its pod end holds the
/// interface name), never refuse it, or coild frees the addresses while
/// that veth still holds them. Anything else holding the name is refused.
#[test]
fn a_rewire_replaces_its_own_wiring_and_refuses_a_foreign_interface() {
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let k = Kernel::in_netns(&node.path(), 119, 30)
            .await
            .expect("kernel");
        let a = spec(&pod, "eth0", "coilkt0000001", "10.98.0.5");
        k.wire_in(&a, None).await.expect("first wire");
        assert_eq!(k.check(&a).await.expect("check"), Vec::<String>::new());
        k.wire_in(&a, None)
            .await
            .expect("the same attachment wired again");
        assert_eq!(k.check(&a).await.expect("check"), Vec::<String>::new());
        let hosts = k.links().await.expect("links");
        assert_eq!(
            hosts
                .iter()
                .filter(|(_, n, _)| n == "coilkt0000001")
                .count(),
            1,
            "{hosts:?}"
        );
        // Another attachment wanting the same pod interface name is
        // refused, and the wiring that holds it is left alone.
        let b = spec(&pod, "eth0", "coilkt0000002", "10.98.0.6");
        match k.wire_in(&b, None).await {
            Err(KernelError::InterfaceExists { .. }) => {}
            other => panic!("a foreign eth0 was not refused: {other:?}"),
        }
        assert_eq!(k.check(&a).await.expect("check"), Vec::<String>::new());
        assert!(k.unwire("coilkt0000001").await.expect("unwire"));
        assert!(!k.unwire("coilkt0000001").await.expect("unwire twice"));
    });
}
