//! Test and benchmark support: a real etcd server on a private loopback
//! port with a temporary data directory.
//!
//! If `COIL_TEST_ETCD_ENDPOINTS` is set (scripts/test starts one etcd for
//! the whole run), tests share that server, each under its own key prefix.
//! Otherwise the first caller in a process starts `etcd` (Debian's
//! etcd-server) itself, watched by a shell loop that stops it within half
//! a second of the test process exiting.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A running etcd the tests may use.
#[derive(Debug)]
pub struct TestEtcd {
    pub endpoint: String,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl TestEtcd {
    /// Starts a private etcd (not shared; stopped on drop). Use it for tests
    /// that stop or restart etcd.
    pub fn start() -> Result<TestEtcd, String> {
        let dir = tempfile::Builder::new()
            .prefix("coil-etcd-")
            .tempdir()
            .map_err(|e| format!("creating etcd data dir: {e}"))?;
        let client = free_port()?;
        let peer = free_port()?;
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let etcd = which_etcd()?;
        let me = std::process::id();
        // The loop ends etcd when this process is gone, and removes its
        // data: the shared etcd lives in a static, which is never dropped.
        let script = format!(
            "\"$0\" \"$@\" >{log} 2>&1 & e=$!; \
             while kill -0 {me} 2>/dev/null && kill -0 $e 2>/dev/null; do sleep 0.5; done; \
             kill $e 2>/dev/null; wait $e; rm -rf '{dir}'",
            log = dir.path().join("etcd.log").display(),
            dir = dir.path().display()
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(&etcd)
            .args(["--name", "coil-test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &format!("coil-test={peer_url}"),
                "--log-level",
                "error",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", etcd.display()))?;
        let t = TestEtcd {
            endpoint,
            child: Some(child),
            _dir: Some(dir),
        };
        t.wait_ready(Duration::from_secs(20))?;
        Ok(t)
    }

    /// Waits until etcd accepts TCP connections on its client port.
    fn wait_ready(&self, limit: Duration) -> Result<(), String> {
        let addr = self.endpoint.trim_start_matches("http://").to_string();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(&addr).is_ok() {
                // The port opens a moment before etcd serves; a short grace
                // avoids a first-request failure.
                std::thread::sleep(Duration::from_millis(100));
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "etcd at {} not ready after {limit:?}",
            self.endpoint
        ))
    }

    /// Stops etcd (SIGKILL of the watcher and etcd).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Kill etcd first (child of the shell), then the shell.
            let _ = Command::new("pkill")
                .args(["-KILL", "-P", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn which_etcd() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("COIL_ETCD_BIN") {
        return Ok(PathBuf::from(p));
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("etcd");
        if p.is_file() {
            return Ok(p);
        }
    }
    for p in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if std::path::Path::new(p).is_file() {
            return Ok(PathBuf::from(p));
        }
    }
    Err(
        "etcd not found: install Debian's etcd-server (scripts/test does) or set COIL_ETCD_BIN"
            .into(),
    )
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a free port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

static SHARED: OnceLock<Mutex<Option<Result<TestEtcd, String>>>> = OnceLock::new();

/// The endpoint of the etcd shared by this test process (started on first
/// use unless `COIL_TEST_ETCD_ENDPOINTS` names one).
pub fn shared_etcd() -> Result<String, String> {
    if let Ok(e) = std::env::var("COIL_TEST_ETCD_ENDPOINTS") {
        if !e.is_empty() {
            return Ok(e);
        }
    }
    let cell = SHARED.get_or_init(|| Mutex::new(None));
    let mut g = cell.lock().unwrap_or_else(|e| e.into_inner());
    if g.is_none() {
        *g = Some(TestEtcd::start());
    }
    match g.as_ref() {
        Some(Ok(t)) => Ok(t.endpoint.clone()),
        Some(Err(e)) => Err(e.clone()),
        None => Err("etcd not started".into()),
    }
}

/// A key prefix no other test in any process uses.
pub fn unique_prefix(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("/coil-test/{tag}-{}-{n}-{nanos:x}/", std::process::id())
}

/// Starts etcd inside the network namespace `netns` (client on
/// 127.0.0.1:2379 there, plus `extra_client` such as "http://10.0.0.1:2379"
/// for other namespaces), with its data in `dir`, and waits until it
/// accepts connections. The caller owns (and must reap) the child.
pub fn start_etcd_in_netns(
    netns: &str,
    dir: &std::path::Path,
    extra_client: Option<&str>,
) -> Result<Child, String> {
    let etcd = which_etcd()?;
    let mut listen = "http://127.0.0.1:2379".to_string();
    if let Some(x) = extra_client {
        listen.push(',');
        listen.push_str(x);
    }
    let advertise = extra_client.unwrap_or("http://127.0.0.1:2379");
    let log = std::fs::File::create(dir.join("etcd.log")).map_err(|e| format!("etcd log: {e}"))?;
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(&etcd)
        .args(["--name", "coil-test", "--data-dir"])
        .arg(dir.join("etcd"))
        .args([
            "--listen-client-urls",
            &listen,
            "--advertise-client-urls",
            advertise,
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "coil-test=http://127.0.0.1:2380",
            "--log-level",
            "error",
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting etcd in {netns}: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "bash",
                "-c",
                "exec 3<>/dev/tcp/127.0.0.1/2379",
            ])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if up {
            std::thread::sleep(Duration::from_millis(200));
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("etcd in {netns} not ready after 30s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Merges benchmark figures into `COIL_BENCH_SUMMARY` (default
/// target/bench/summary.json at the workspace root) as
/// `{"name": {"value": number, "unit": "..."}}`.
/// A counter or gauge of etcd's /metrics on a plain-HTTP client endpoint
/// (`http://127.0.0.1:PORT`): the sum over lines that start with `name` and
/// contain every one of `with` (label matchers such as
/// `grpc_method="LeaseKeepAlive"`). The tests and benchmarks count etcd's
/// load with etcd's own counters.
pub fn etcd_metric(endpoint: &str, name: &str, with: &[&str]) -> Result<f64, String> {
    use std::io::{Read, Write};
    let addr = endpoint.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr)
        .map_err(|e| format!("connecting to etcd at {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")
        .map_err(|e| format!("asking etcd for /metrics: {e}"))?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .map_err(|e| format!("reading etcd's /metrics: {e}"))?;
    Ok(body
        .lines()
        .filter(|l| l.starts_with(name) && with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Merges `figures` into the bench summary: `COIL_BENCH_SUMMARY`, else the
/// workspace's target/bench/summary.json (this crate lives one level
/// below the workspace root).
pub fn write_bench_summary(figures: &[(String, f64, &str)]) -> Result<PathBuf, String> {
    let path = std::env::var("COIL_BENCH_SUMMARY")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let crate_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
            crate_dir
                .parent()
                .unwrap_or(crate_dir)
                .join("target")
                .join("bench")
                .join("summary.json")
        });
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let mut all: std::collections::BTreeMap<String, serde_json::Value> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    for (name, value, unit) in figures {
        let v = (value * 1000.0).round() / 1000.0;
        all.insert(name.clone(), serde_json::json!({"value": v, "unit": unit}));
    }
    let text = serde_json::to_string_pretty(&all).map_err(|e| e.to_string())?;
    std::fs::write(&path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// Runs a command; its stdout, or an error naming the command and its
/// stderr.
fn run(args: &[&str]) -> Result<String, String> {
    let (cmd, rest) = args.split_first().ok_or("empty command")?;
    let o = Command::new(cmd)
        .args(rest)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if !o.status.success() {
        return Err(format!(
            "{}: {}: {}",
            args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The subnet of every [`EtcdCluster`]'s hub. It exists only inside the
/// namespaces a cluster creates, so clusters (and the host) never clash.
pub const CLUSTER_NET: &str = "10.199.0";
const CLUSTER_SIZE: usize = 3;

/// TLS material an [`EtcdCluster`] generates (PEM files).
#[derive(Debug, Clone)]
pub struct ClusterTls {
    /// The CA every member and client trusts.
    pub ca: PathBuf,
    /// A client certificate and key signed by that CA.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A client certificate and key signed by another CA (rejected).
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
}

/// One member of an [`EtcdCluster`].
#[derive(Debug)]
struct ClusterMember {
    name: String,
    netns: String,
    /// Its veth on the hub's bridge.
    hub_link: String,
    ip: String,
    child: Option<Child>,
}

/// A 3-member etcd cluster with peer and client TLS (client certificates
/// required), each member in its own network namespace, wired by veths to
/// a bridge in a "hub" namespace. Clients reach it from a namespace
/// [`attach`](EtcdCluster::attach)ed to the hub. Members can be killed,
/// restarted, partitioned (their link to the hub cut) and healed. Drop
/// stops the members it started (by pid) and deletes the namespaces it
/// created; members also die with the thread that started them (see
/// [`start`](EtcdCluster::start)). Needs root, `ip`, `openssl`, `curl` and
/// etcd.
#[derive(Debug)]
pub struct EtcdCluster {
    tag: String,
    hub: String,
    members: Vec<ClusterMember>,
    /// Namespaces this cluster created (hub and members), for Drop.
    owned_netns: Vec<String>,
    attached: u32,
    etcd: PathBuf,
    pub tls: ClusterTls,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Creates the namespaces, the certificates and the members, and waits
    /// (bounded) until every member reports healthy.
    pub fn new() -> Result<EtcdCluster, String> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let etcd = which_etcd()?;
        let dir = tempfile::Builder::new()
            .prefix("coil-etcd-cluster-")
            .tempdir()
            .map_err(|e| format!("creating the cluster's dir: {e}"))?;
        let tag = format!(
            "ec{}x{}",
            std::process::id() % 100_000,
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut c = EtcdCluster {
            hub: format!("{tag}hub"),
            tag: tag.clone(),
            members: Vec::new(),
            owned_netns: Vec::new(),
            attached: 0,
            etcd,
            tls: ClusterTls {
                ca: dir.path().join("ca.pem"),
                cert: dir.path().join("client.pem"),
                key: dir.path().join("client.key"),
                rogue_cert: dir.path().join("rogue.pem"),
                rogue_key: dir.path().join("rogue.key"),
            },
            dir,
        };
        // From here on, Drop cleans up whatever was made.
        c.make_network()?;
        c.make_certs()?;
        for i in 0..CLUSTER_SIZE {
            c.start(i)?;
        }
        c.wait_healthy(&[0, 1, 2], Duration::from_secs(30))?;
        Ok(c)
    }

    fn add_netns(&mut self, name: &str) -> Result<(), String> {
        run(&["ip", "netns", "add", name])?;
        self.owned_netns.push(name.to_string());
        run(&["ip", "-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn make_network(&mut self) -> Result<(), String> {
        let hub = self.hub.clone();
        self.add_netns(&hub)?;
        run(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        run(&[
            "ip",
            "-n",
            &hub,
            "addr",
            "add",
            &format!("{CLUSTER_NET}.1/24"),
            "dev",
            "br0",
        ])?;
        run(&["ip", "-n", &hub, "link", "set", "br0", "up"])?;
        for i in 0..CLUSTER_SIZE {
            let netns = format!("{}m{i}", self.tag);
            self.add_netns(&netns)?;
            let hub_link = format!("m{i}");
            let ip = format!("{CLUSTER_NET}.{}", 11 + i);
            self.plug(&netns, &hub_link, &ip)?;
            self.members.push(ClusterMember {
                name: format!("m{i}"),
                netns,
                hub_link,
                ip,
                child: None,
            });
        }
        Ok(())
    }

    /// A veth from the hub's bridge (`hub_link`) to `eth0` in `netns`,
    /// with `ip`/24 on it.
    fn plug(&self, netns: &str, hub_link: &str, ip: &str) -> Result<(), String> {
        let hub = &self.hub;
        run(&[
            "ip", "-n", hub, "link", "add", hub_link, "type", "veth", "peer", "name", "eth0",
            "netns", netns,
        ])?;
        run(&["ip", "-n", hub, "link", "set", hub_link, "master", "br0"])?;
        run(&["ip", "-n", hub, "link", "set", hub_link, "up"])?;
        run(&[
            "ip",
            "-n",
            netns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ])?;
        run(&["ip", "-n", netns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    fn make_certs(&self) -> Result<(), String> {
        let d = self.dir.path();
        let p = |n: &str| d.join(n).display().to_string();
        let ca = |name: &str, cn: &str| -> Result<(), String> {
            run(&[
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &p(&format!("{name}.key")),
                "-out",
                &p(&format!("{name}.pem")),
                "-days",
                "2",
                "-subj",
                &format!("/CN={cn}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ])
            .map(|_| ())
        };
        let leaf = |name: &str, ca: &str, ext: &str| -> Result<(), String> {
            std::fs::write(d.join(format!("{name}.ext")), ext)
                .map_err(|e| format!("writing {name}.ext: {e}"))?;
            run(&[
                "openssl",
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &p(&format!("{name}.key")),
                "-out",
                &p(&format!("{name}.csr")),
                "-subj",
                &format!("/CN={name}"),
            ])?;
            run(&[
                "openssl",
                "x509",
                "-req",
                "-in",
                &p(&format!("{name}.csr")),
                "-CA",
                &p(&format!("{ca}.pem")),
                "-CAkey",
                &p(&format!("{ca}.key")),
                "-set_serial",
                &format!("{}", rand::random::<u32>()),
                "-days",
                "2",
                "-extfile",
                &p(&format!("{name}.ext")),
                "-out",
                &p(&format!("{name}.pem")),
            ])
            .map(|_| ())
        };
        ca("ca", "coil-test-ca")?;
        ca("rogue-ca", "coil-test-rogue-ca")?;
        for m in &self.members {
            leaf(
                &m.name,
                "ca",
                &format!(
                    "subjectAltName=IP:{},IP:127.0.0.1\n\
                     keyUsage=critical,digitalSignature,keyEncipherment\n\
                     extendedKeyUsage=serverAuth,clientAuth\n",
                    m.ip
                ),
            )?;
        }
        let client_ext = "keyUsage=critical,digitalSignature,keyEncipherment\n\
                          extendedKeyUsage=clientAuth\n";
        leaf("client", "ca", client_ext)?;
        leaf("rogue", "rogue-ca", client_ext)?;
        Ok(())
    }

    /// The client URLs, https://IP:2379, one per member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("https://{}:2379", m.ip))
            .collect()
    }

    /// The endpoints comma-separated, as coild and coilctl take them.
    pub fn endpoints_csv(&self) -> String {
        self.endpoints().join(",")
    }

    /// Member `i`'s log (its stderr).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("m{i}.log"))).unwrap_or_default()
    }

    /// Starts member `i` (again) on its data dir; returns once the process
    /// runs (see [`wait_healthy`](Self::wait_healthy)). The member gets
    /// SIGKILL if the calling thread ends first, so a test killed outright
    /// leaves no etcd behind.
    pub fn start(&mut self, i: usize) -> Result<(), String> {
        let cluster = self
            .members
            .iter()
            .map(|m| format!("{}=https://{}:2380", m.name, m.ip))
            .collect::<Vec<_>>()
            .join(",");
        let d = self.dir.path().to_path_buf();
        let m = self
            .members
            .get_mut(i)
            .ok_or_else(|| format!("no member {i}"))?;
        if m.child.is_some() {
            return Err(format!("member {i} already runs"));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join(format!("m{i}.log")))
            .map_err(|e| format!("member {i}'s log: {e}"))?;
        let client = format!("https://{}:2379", m.ip);
        let peer = format!("https://{}:2380", m.ip);
        let cert = d.join(format!("{}.pem", m.name));
        let key = d.join(format!("{}.key", m.name));
        let ca = d.join("ca.pem");
        // `ip netns exec` execs etcd: the child's pid is etcd's.
        let mut cmd = Command::new("ip");
        // If this process dies without running Drop (SIGKILL), the member
        // dies with it. (The signal follows the thread that started the
        // member: keep the cluster on the test's thread.)
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls prctl, which is async-signal-safe.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .args(["netns", "exec", &m.netns])
            .arg(&self.etcd)
            .args(["--name", &m.name, "--data-dir"])
            .arg(d.join(format!("{}.data", m.name)))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                &self.tag,
                "--client-cert-auth",
                "--peer-client-cert-auth",
                "--log-level",
                "warn",
            ])
            .arg("--cert-file")
            .arg(&cert)
            .arg("--key-file")
            .arg(&key)
            .arg("--trusted-ca-file")
            .arg(&ca)
            .arg("--peer-cert-file")
            .arg(&cert)
            .arg("--peer-key-file")
            .arg(&key)
            .arg("--peer-trusted-ca-file")
            .arg(&ca)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting member {i}: {e}"))?;
        m.child = Some(child);
        Ok(())
    }

    /// Kills member `i` (SIGKILL; its data dir stays).
    pub fn kill(&mut self, i: usize) {
        if let Some(m) = self.members.get_mut(i) {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Cuts member `i`'s link to the hub: it keeps running, but nothing
    /// reaches it and it reaches nothing (packets are dropped, so
    /// connections hang rather than fail).
    pub fn partition(&self, i: usize) -> Result<(), String> {
        let m = self
            .members
            .get(i)
            .ok_or_else(|| format!("no member {i}"))?;
        run(&["ip", "-n", &self.hub, "link", "set", &m.hub_link, "down"]).map(|_| ())
    }

    /// Restores member `i`'s link to the hub.
    pub fn heal(&self, i: usize) -> Result<(), String> {
        let m = self
            .members
            .get(i)
            .ok_or_else(|| format!("no member {i}"))?;
        run(&["ip", "-n", &self.hub, "link", "set", &m.hub_link, "up"]).map(|_| ())
    }

    /// Puts the namespace `netns` (created by the caller) on the hub; its
    /// address there. The veth goes when the cluster (its hub) goes.
    pub fn attach(&mut self, netns: &str) -> Result<String, String> {
        self.attached += 1;
        let n = self.attached;
        if n > 100 {
            return Err("too many namespaces attached".into());
        }
        let ip = format!("{CLUSTER_NET}.{}", 100 + n);
        let hub_link = format!("c{n}");
        // The namespace's end is named after the hub, so several clusters
        // can be attached to one namespace.
        let hub = &self.hub;
        let inner = format!("e{}", &self.tag);
        let inner: String = inner.chars().take(15).collect();
        run(&[
            "ip", "-n", hub, "link", "add", &hub_link, "type", "veth", "peer", "name", &inner,
            "netns", netns,
        ])?;
        run(&["ip", "-n", hub, "link", "set", &hub_link, "master", "br0"])?;
        run(&["ip", "-n", hub, "link", "set", &hub_link, "up"])?;
        run(&[
            "ip",
            "-n",
            netns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            &inner,
        ])?;
        run(&["ip", "-n", netns, "link", "set", &inner, "up"])?;
        Ok(ip)
    }

    /// Is member `i` healthy (it answers /health with a leader)? Asked
    /// from the hub, with the client certificate.
    pub fn healthy(&self, i: usize) -> bool {
        let Some(m) = self.members.get(i) else {
            return false;
        };
        let out = Command::new("ip")
            .args(["netns", "exec", &self.hub, "curl", "-s", "--max-time", "2"])
            .arg("--cacert")
            .arg(&self.tls.ca)
            .arg("--cert")
            .arg(&self.tls.cert)
            .arg("--key")
            .arg(&self.tls.key)
            .arg(format!("https://{}:2379/health", m.ip))
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"health\":\"true\""))
    }

    /// Waits (bounded) until every member in `which` is healthy.
    pub fn wait_healthy(&self, which: &[usize], limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            let sick: Vec<usize> = which
                .iter()
                .copied()
                .filter(|&i| !self.healthy(i))
                .collect();
            if sick.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = sick
                    .iter()
                    .map(|&i| format!("member {i} log:\n{}", self.log(i)))
                    .collect();
                return Err(format!(
                    "members {sick:?} not healthy after {limit:?}\n{}",
                    logs.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        for n in self.owned_netns.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
