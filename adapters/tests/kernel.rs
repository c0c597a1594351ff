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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The adapter on the node netns `node`.
async fn kernel(node: &Netns) -> Kernel {
    Kernel::in_netns(&node.path(), 119, 30)
        .await
        .expect("kernel")
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
    runtime().block_on(async {
        let k = kernel(&node).await;
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

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Persist before act, at the adapter: a gated wire makes the links and
/// the pod's routes at once but gives the pod no address and the node no
/// route to it until its gate says the reservation is durable; a gate
/// that says false, or is dropped, leaves nothing behind.
#[test]
fn a_gated_wire_adds_no_address_until_its_reservation_is_durable() {
    let node = Netns::new("gnode");
    let pod = Netns::new("gpod");
    runtime().block_on(async {
        let k = kernel(&node).await;
        // Waits (bounded) until the wire's links and the pod's default
        // route exist: the job is then parked on its gate.
        let prepared = |pod: &Netns, ifname: &str| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let routes = ip(&["-n", &pod.0, "route", "show", "dev", ifname]);
                if routes.contains("default via 169.254.1.1") {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the wire never made {ifname}'s links: {routes} / {}",
                    ip(&["-n", &pod.0, "link"])
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        };

        // Gate opened: the addresses come only after it.
        let a = spec(&pod, "eth0", "coilktg000001", "10.98.0.7");
        let (gate, durable) = tokio::sync::oneshot::channel::<bool>();
        let ns = std::fs::File::open(pod.path()).expect("pod netns");
        let wire = tokio::spawn(k.wire_after(a.clone(), Some(ns), async move {
            durable.await.unwrap_or(false)
        }));
        prepared(&pod, "eth0");
        let addrs = ip(&["-n", &pod.0, "addr", "show", "dev", "eth0"]);
        assert!(
            !addrs.contains("10.98.0.7"),
            "address before durable: {addrs}"
        );
        let routes = ip(&["-n", &node.0, "route", "show", "10.98.0.7"]);
        assert!(
            routes.trim().is_empty(),
            "host route before durable: {routes}"
        );
        gate.send(true).expect("gate");
        wire.await.expect("task").expect("wire");
        assert_eq!(k.check(&a).await.expect("check"), Vec::<String>::new());
        let addrs = ip(&["-n", &pod.0, "addr", "show", "dev", "eth0"]);
        assert!(addrs.contains("10.98.0.7/32"), "{addrs}");

        // Gate closed, then gate dropped: nothing is left, and the wire
        // says why.
        for (n, close) in [(1, true), (2, false)] {
            // A pod of its own: the first holds the gateway route.
            let pod = Netns::new(&format!("gpod{n}"));
            let ifname = "eth0";
            let veth = format!("coilktg00000{}", n + 1);
            let b = spec(&pod, ifname, &veth, &format!("10.98.0.{}", 7 + n));
            let (gate, durable) = tokio::sync::oneshot::channel::<bool>();
            let ns = std::fs::File::open(pod.path()).expect("pod netns");
            let wire = tokio::spawn(k.wire_after(b.clone(), Some(ns), async move {
                durable.await.unwrap_or(false)
            }));
            prepared(&pod, ifname);
            if close {
                gate.send(false).expect("gate");
            } else {
                drop(gate);
            }
            let err = wire
                .await
                .expect("task")
                .expect_err("an abandoned wire fails");
            assert!(err.to_string().contains("abandoned"), "{err}");
            let hosts = k.links().await.expect("links");
            assert!(hosts.iter().all(|(_, name, _)| name != &veth), "{hosts:?}");
            let links = ip(&["-n", &pod.0, "link", "show"]);
            assert!(!links.contains(&format!(" {ifname}@")), "{links}");
        }
        k.unwire("coilktg000001").await.expect("unwire");
    });
}
