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
        // The loop ends etcd when this process is gone.
        let script = format!(
            "\"$0\" \"$@\" >{log} 2>&1 & e=$!; \
             while kill -0 {me} 2>/dev/null && kill -0 $e 2>/dev/null; do sleep 0.5; done; \
             kill $e 2>/dev/null; wait $e",
            log = dir.path().join("etcd.log").display()
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
pub fn write_bench_summary(figures: &[(String, f64, &str)]) -> Result<PathBuf, String> {
    let path = std::env::var("COIL_BENCH_SUMMARY")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
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
