//! The node under test: its netns, etcd and coild processes, and calls of
//! the real plugin.

use super::*;

pub(crate) fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

pub(crate) fn sh_ok(args: &[&str]) -> String {
    let o = sh(args);
    assert!(o.status.success(), "{args:?}: {o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The node: its netns, etcd, coild and the binaries.
pub(crate) struct Node {
    pub(crate) ns: String,
    pub(crate) dir: PathBuf,
    pub(crate) bins: PathBuf,
    pub(crate) socket: PathBuf,
    pub(crate) etcd: Mutex<Option<Child>>,
    pub(crate) coild: Mutex<Option<Child>>,
    pub(crate) boot: AtomicU64,
}

impl Node {
    pub(crate) fn bin(&self, name: &str) -> String {
        self.bins.join(name).display().to_string()
    }

    pub(crate) fn in_ns(&self, args: &[&str]) -> Output {
        let mut v = vec!["ip", "netns", "exec", &self.ns];
        v.extend_from_slice(args);
        sh(&v)
    }

    pub(crate) fn start_etcd(&self) {
        let mut g = self.etcd.lock().expect("etcd");
        if g.is_some() {
            return;
        }
        let log = std::fs::File::create(self.dir.join("etcd.log")).expect("log");
        let c = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "etcd",
                "--name",
                "c",
                "--data-dir",
            ])
            .arg(self.dir.join("etcd"))
            .args([
                "--listen-client-urls",
                "http://127.0.0.1:2379",
                "--advertise-client-urls",
                "http://127.0.0.1:2379",
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "c=http://127.0.0.1:2380",
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd");
        *g = Some(c);
        drop(g);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self
            .in_ns(&["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/2379"])
            .status
            .success()
        {
            assert!(Instant::now() < deadline, "etcd did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn kill_etcd(&self) {
        if let Some(mut c) = self.etcd.lock().expect("etcd").take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) fn set_boot(&self, n: u64) {
        self.boot.store(n, Ordering::SeqCst);
        std::fs::write(self.dir.join("boot_id"), format!("chaos-boot-{n}\n")).expect("boot id");
    }

    /// Starts coild; Err when it exits before serving (e.g. it refused a
    /// corrupt journal).
    pub(crate) fn start_coild(&self, failpoint: Option<&str>) -> Result<(), String> {
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("coild.log"))
            .expect("log");
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, &self.bin("coild")])
            .args([
                "--store",
                "etcd",
                "--etcd-endpoints",
                "http://127.0.0.1:2379",
                "--etcd-timeout",
                "1s",
                "--node-name",
                "chaos-node",
                "--resync-interval",
                "1s",
                "--min-blocks",
                "1",
                "--liveness-ttl",
                "5s",
            ])
            .arg("--state-dir")
            .arg(&self.dir)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--boot-id-file")
            .arg(self.dir.join("boot_id"))
            .env("COIL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(fp) = failpoint {
            c.env("COIL_FAILPOINTS", fp);
        }
        let mut child = c.spawn().map_err(|e| format!("spawn coild: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.socket.exists() {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!("coild exited at start: {st}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("coild did not become ready".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        *self.coild.lock().expect("coild") = Some(child);
        Ok(())
    }

    pub(crate) fn kill_coild(&self) {
        if let Some(mut c) = self.coild.lock().expect("coild").take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Some(signal) when coild died on its own (a failpoint aborts).
    pub(crate) fn reap(&self) -> Option<Option<i32>> {
        use std::os::unix::process::ExitStatusExt;
        let mut g = self.coild.lock().expect("coild");
        let st = g.as_mut()?.try_wait().ok().flatten()?;
        *g = None;
        Some(st.signal())
    }

    pub(crate) fn coilctl(&self, args: &[&str]) -> Output {
        let ctl = self.bin("coilctl");
        let jdir = self.dir.join("journal").display().to_string();
        let sock = self.socket.display().to_string();
        let mut v = vec![
            ctl.as_str(),
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
            "--journal-dir",
            &jdir,
            "--socket",
            &sock,
        ];
        v.extend_from_slice(args);
        self.in_ns(&v)
    }

    pub(crate) fn stats(&self) -> Value {
        use std::io::Read;
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&self.socket) else {
            return Value::Null;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = s.write_all(br#"{"stats":{}}"#);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        serde_json::from_str(&out).unwrap_or(Value::Null)
    }

    pub(crate) fn coil_links(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.in_ns(&["ip", "-o", "link", "show"]).stdout)
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|s| s.trim().split('@').next().unwrap_or("").to_string())
            .filter(|s| s.starts_with("coil"))
            .collect()
    }

    /// The blocks published in table 119, both families.
    pub(crate) fn table119(&self) -> BTreeSet<String> {
        ["-4", "-6"]
            .iter()
            .flat_map(|f| {
                String::from_utf8_lossy(
                    &self
                        .in_ns(&["ip", f, "route", "show", "table", "119"])
                        .stdout,
                )
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(String::from))
                .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// A CNI call's outcome.
pub(crate) struct Res {
    pub(crate) code: i32,
    pub(crate) out: Value,
}

pub(crate) fn cni(node: &Node, cmd: &str, cid: &str, netns: Option<&str>) -> Res {
    call_plugin(&node.bin("coil"), &node.socket, cmd, cid, netns)
}

/// Calls the `coil` plugin at `bin` as a runtime would, for the coild at
/// `socket`; never panics (a failure to run it is a result too).
pub(crate) fn call_plugin(
    bin: &str,
    socket: &std::path::Path,
    cmd: &str,
    cid: &str,
    netns: Option<&str>,
) -> Res {
    let conf = format!(
        r#"{{"cniVersion":"1.1.0","name":"chaos","type":"coil","socket":"{}"}}"#,
        socket.display()
    );
    let mut c = Command::new(bin);
    c.env_clear()
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={cid}"),
        );
    if let Some(ns) = netns {
        c.env("CNI_NETNS", format!("/run/netns/{ns}"));
    }
    let spawned = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let mut ch = match spawned {
        Ok(ch) => ch,
        Err(e) => {
            return Res {
                code: -1,
                out: Value::String(format!("spawn coil: {e}")),
            }
        }
    };
    if let Some(mut i) = ch.stdin.take() {
        let _ = i.write_all(conf.as_bytes());
    }
    let o = match ch.wait_with_output() {
        Ok(o) => o,
        Err(e) => {
            return Res {
                code: -1,
                out: Value::String(format!("wait coil: {e}")),
            }
        }
    };
    let raw = String::from_utf8_lossy(&o.stdout);
    Res {
        code: o.status.code().unwrap_or(-1),
        out: if raw.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&raw).unwrap_or(Value::String(raw.to_string()))
        },
    }
}

pub(crate) fn sh_quiet(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
