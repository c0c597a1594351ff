//! The storm: concurrent ADD/DEL workers, the model of what was
//! acknowledged, and the faults (kills, reboots, corruption).

use super::*;

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) ops: AtomicU64,
    pub(crate) add_ok: AtomicU64,
    pub(crate) add_err: AtomicU64,
    pub(crate) del_ok: AtomicU64,
    pub(crate) del_err: AtomicU64,
    pub(crate) retryable: AtomicU64,
    pub(crate) kills: AtomicU64,
    pub(crate) failpoint_kills: AtomicU64,
    pub(crate) etcd_restarts: AtomicU64,
    pub(crate) reboots: AtomicU64,
    pub(crate) corruptions: AtomicU64,
    pub(crate) rebuilds: AtomicU64,
}

/// What the callers believe.
#[derive(Default)]
pub(crate) struct Model {
    /// ADD answered success, not deleted since: cid -> (netns, address).
    /// Live pods: netns and the addresses ADD answered (one per family).
    pub(crate) live: BTreeMap<String, (String, Vec<IpAddr>)>,
    /// Must be DELeted (failed ADD, or chosen), with its netns if it still
    /// exists.
    pub(crate) to_del: Vec<(String, Option<String>)>,
    pub(crate) violations: Vec<String>,
    pub(crate) next: u64,
}

pub(crate) struct Shared {
    pub(crate) node: Node,
    pub(crate) model: Mutex<Model>,
    pub(crate) c: Counters,
    pub(crate) paused: AtomicBool,
    pub(crate) stop: AtomicBool,
    pub(crate) inflight: AtomicUsize,
}

impl Shared {
    pub(crate) fn violation(&self, v: String) {
        eprintln!("VIOLATION: {v}");
        self.model.lock().expect("model").violations.push(v);
    }

    /// A failed call must carry a CNI error object.
    pub(crate) fn check_error(&self, what: &str, r: &Res) {
        match r.out.get("code").and_then(Value::as_u64) {
            Some(11) => {
                self.c.retryable.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {}
            None => self.violation(format!(
                "{what} failed (exit {}) without a CNI error: {}",
                r.code, r.out
            )),
        }
    }
}

pub(crate) fn worker(sh: Arc<Shared>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !sh.stop.load(Ordering::SeqCst) {
        if sh.paused.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        sh.inflight.fetch_add(1, Ordering::SeqCst);
        if sh.paused.load(Ordering::SeqCst) {
            sh.inflight.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let ok = one_op(&sh, &mut rng);
        sh.inflight.fetch_sub(1, Ordering::SeqCst);
        if !ok {
            // A runtime backs off after an error (code 11 says: later).
            std::thread::sleep(Duration::from_millis(rng.gen_range(20..80)));
        }
    }
}

/// One caller operation; false when the call failed.
pub(crate) fn one_op(sh: &Shared, rng: &mut StdRng) -> bool {
    let node = &sh.node;
    let (live_n, pending) = {
        let m = sh.model.lock().expect("model");
        (m.live.len(), m.to_del.len())
    };
    sh.c.ops.fetch_add(1, Ordering::Relaxed);
    if pending > 0 && rng.gen_bool(0.5) {
        let item = {
            let mut m = sh.model.lock().expect("model");
            if m.to_del.is_empty() {
                return true;
            }
            let i = rng.gen_range(0..m.to_del.len());
            m.to_del.swap_remove(i)
        };
        let r = cni(node, "DEL", &item.0, item.1.as_deref());
        if r.code == 0 {
            sh.c.del_ok.fetch_add(1, Ordering::Relaxed);
            if let Some(ns) = &item.1 {
                let _ = sh_quiet(&["ip", "netns", "del", ns]);
            }
            return true;
        }
        sh.c.del_err.fetch_add(1, Ordering::Relaxed);
        sh.check_error("DEL", &r);
        sh.model.lock().expect("model").to_del.push(item);
        return false;
    }
    if live_n < 24 || rng.gen_bool(0.45) {
        let cid = {
            let mut m = sh.model.lock().expect("model");
            m.next += 1;
            format!("chaos{:06}", m.next)
        };
        let ns = format!("cx{}", &cid[5..]);
        if !sh_quiet(&["ip", "netns", "add", &ns]) {
            return false;
        }
        let r = cni(node, "ADD", &cid, Some(&ns));
        let ips: Vec<IpAddr> = r.out["ips"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["address"].as_str())
                    .filter_map(|a| a.split('/').next()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        match r.code {
            0 => {
                sh.c.add_ok.fetch_add(1, Ordering::Relaxed);
                // The pool is dual-stack: one address of each family.
                let v4 = ips.iter().filter(|a| a.is_ipv4()).count();
                let v6 = ips.iter().filter(|a| a.is_ipv6()).count();
                if (v4, v6) != (1, 1) {
                    sh.violation(format!(
                        "ADD of {cid} answered {ips:?}, not one IPv4 and one IPv6 address"
                    ));
                }
                let mut m = sh.model.lock().expect("model");
                for ip in &ips {
                    if let Some((other, _)) = m.live.iter().find(|(_, (_, a))| a.contains(ip)) {
                        let v = format!("ADD of {cid} answered {ip}, which {other} still holds");
                        drop(m);
                        sh.violation(v);
                        m = sh.model.lock().expect("model");
                    }
                }
                m.live.insert(cid, (ns, ips));
                true
            }
            _ => {
                sh.c.add_err.fetch_add(1, Ordering::Relaxed);
                sh.check_error("ADD", &r);
                // The runtime DELs after a failed ADD.
                sh.model.lock().expect("model").to_del.push((cid, Some(ns)));
                false
            }
        }
    } else {
        let item = {
            let mut m = sh.model.lock().expect("model");
            if m.live.is_empty() {
                return true;
            }
            let i = rng.gen_range(0..m.live.len());
            let k = m.live.keys().nth(i).cloned();
            k.and_then(|k| m.live.remove(&k).map(|v| (k, v)))
        };
        if let Some((cid, (ns, _))) = item {
            sh.model.lock().expect("model").to_del.push((cid, Some(ns)));
        }
        true
    }
}

/// Holds the callers off and waits for the calls in flight.
pub(crate) fn pause(sh: &Shared) {
    sh.paused.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(120);
    while sh.inflight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(crate) fn ensure_coild(sh: &Shared) {
    for attempt in 0..5 {
        if sh.node.coild.lock().expect("coild").is_some() {
            return;
        }
        match sh.node.start_coild(None) {
            Ok(()) => return,
            Err(e) => {
                // A journal coild refuses: rebuild it from etcd and the kernel.
                eprintln!(
                    "coild would not start ({e}); rebuilding its journal (attempt {attempt})"
                );
                sh.node.start_etcd();
                let boot = sh.node.dir.join("boot_id").display().to_string();
                let o = sh.node.coilctl(&[
                    "node",
                    "repair",
                    "chaos-node",
                    "--rebuild",
                    "--boot-id-file",
                    &boot,
                ]);
                sh.c.rebuilds.fetch_add(1, Ordering::Relaxed);
                if !o.status.success() {
                    sh.violation(format!(
                        "node repair --rebuild failed: {}",
                        String::from_utf8_lossy(&o.stderr)
                    ));
                }
            }
        }
    }
    sh.violation("coild could not be started again".into());
}

pub(crate) fn reboot(sh: &Shared) {
    pause(sh);
    sh.node.kill_coild();
    {
        let mut m = sh.model.lock().expect("model");
        let live: Vec<(String, (String, Vec<IpAddr>))> =
            std::mem::take(&mut m.live).into_iter().collect();
        for (cid, (ns, _)) in live {
            let _ = sh_quiet(&["ip", "netns", "del", &ns]);
            // The runtime cleans the dead sandbox up: a DEL without netns.
            m.to_del.push((cid, None));
        }
        for item in m.to_del.iter_mut() {
            if let Some(ns) = item.1.take() {
                let _ = sh_quiet(&["ip", "netns", "del", &ns]);
            }
        }
    }
    for l in sh.node.coil_links() {
        let _ = sh.node.in_ns(&["ip", "link", "del", &l]);
    }
    let _ = sh.node.in_ns(&["ip", "route", "flush", "table", "119"]);
    let _ = sh.node.in_ns(&["ip", "route", "flush", "proto", "30"]);
    sh.node.set_boot(sh.node.boot.load(Ordering::SeqCst) + 1);
    sh.c.reboots.fetch_add(1, Ordering::Relaxed);
    ensure_coild(sh);
    sh.paused.store(false, Ordering::SeqCst);
}

pub(crate) fn corrupt(sh: &Shared, rng: &mut StdRng) {
    pause(sh);
    sh.node.kill_coild();
    // Damage the journal detectably (a silently truncated log of
    // acknowledged writes is not a failure a disk produces, and nothing
    // could detect it): either it is lost entirely, or its checkpoint
    // marker is garbage. coild must refuse both; the journal is then
    // rebuilt from etcd and the kernel.
    let jdir = sh.node.dir.join("journal");
    if rng.gen_bool(0.5) {
        let _ = std::fs::remove_dir_all(&jdir);
    } else {
        let _ = std::fs::write(jdir.join("CHECKPOINT"), b"this is not a checkpoint");
    }
    sh.c.corruptions.fetch_add(1, Ordering::Relaxed);
    ensure_coild(sh);
    sh.paused.store(false, Ordering::SeqCst);
}
