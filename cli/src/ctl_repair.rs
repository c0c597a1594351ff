//! `coilctl node repair`: brings this node's journal, the store and the
//! kernel back into agreement, printing the plan as it goes.
//!
//! With coild running, coild runs the repair (it owns the journal) and
//! answers with the outcomes. With coild stopped, coilctl runs the same
//! recovery itself, on this node (the kernel it inspects is the current
//! network namespace's). `--rebuild` writes a new journal from the store's
//! leases and the kernel's veth aliases; it needs coild stopped.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use coil::exit;
use coil::journal::{Journal, JournalError};
use coil::store::embedded::EmbeddedBackend;
use coil::store::{Backend, Store};
use coil_adapters::etcd::EtcdBackend;
use coil_adapters::kernel::Kernel;
use coil_adapters::AnyBackend;
use serde_json::{json, Value};

use crate::ctl_config::{StoreArgs, StoreConfig, StoreKind};
use crate::output::Table;

/// Options of `node repair`.
#[derive(Debug, Clone)]
pub struct RepairOpts {
    pub node: Option<String>,
    pub dry_run: bool,
    pub rebuild: bool,
    pub json: bool,
    pub table_id: u32,
    pub protocol_id: u8,
    pub mtu: u32,
    pub boot_id_file: PathBuf,
}

/// One outcome as coild or the local run reports it.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct Step {
    pub text: String,
    pub action: Value,
    pub ok: bool,
    pub error: Option<String>,
}

impl Step {
    pub fn from_outcome(o: coil_recovery::Outcome) -> Step {
        Step {
            text: o.action.to_string(),
            action: serde_json::to_value(&o.action).unwrap_or(Value::Null),
            ok: o.ok,
            error: o.error,
        }
    }
}

fn print(opts: &RepairOpts, node: &str, mode: &str, steps: &[Step], extra: Value) -> i32 {
    let failed = steps.iter().filter(|s| !s.ok).count();
    if opts.json {
        let v = json!({
            "node": node,
            "mode": mode,
            "dry_run": opts.dry_run,
            "steps": steps,
            "failed": failed,
            "extra": extra,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
        );
    } else {
        if !extra.is_null() {
            println!("{}", extra_text(&extra));
        }
        if steps.is_empty() {
            println!("node {node}: journal, store and kernel agree; nothing to do");
        } else {
            let mut t = Table::new(&["STEP", "ACTION", "RESULT"]);
            for (i, s) in steps.iter().enumerate() {
                let result = if opts.dry_run {
                    "planned".to_string()
                } else if s.ok {
                    "done".to_string()
                } else {
                    format!("FAILED: {}", s.error.as_deref().unwrap_or(""))
                };
                t.row(vec![(i + 1).to_string(), s.text.clone(), result]);
            }
            print!("{}", t.render());
            println!(
                "node {node} ({mode}): {} step(s){}, {failed} failed",
                steps.len(),
                if opts.dry_run { " planned" } else { " applied" }
            );
        }
    }
    if failed > 0 {
        exit::PROBLEMS
    } else {
        exit::OK
    }
}

fn extra_text(v: &Value) -> String {
    let mut s = String::from("rebuilt the journal:");
    for k in ["moved_to", "leases", "attachments", "addresses"] {
        if let Some(x) = v.get(k) {
            s.push_str(&format!(" {k}={x}"));
        }
    }
    if let Some(sk) = v.get("skipped").and_then(Value::as_array) {
        for x in sk {
            s.push_str(&format!("\n  skipped {}", x.as_str().unwrap_or("")));
        }
    }
    s
}

/// Asks a running coild to repair; None when no coild answers.
fn via_coild(socket: &Path, dry_run: bool) -> Option<Result<(String, Vec<Step>), String>> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(600)));
    let req = coil::api::SocketRequest::Repair { apply: !dry_run };
    let body = serde_json::to_vec(&req).unwrap_or_default();
    if s.write_all(&body).is_err() || s.shutdown(std::net::Shutdown::Write).is_err() {
        return None;
    }
    let mut out = String::new();
    if let Err(e) = s.read_to_string(&mut out) {
        return Some(Err(format!("reading coild's answer: {e}")));
    }
    let v: Value = match serde_json::from_str(&out) {
        Ok(v) => v,
        Err(e) => return Some(Err(format!("coild gave no valid answer: {e}"))),
    };
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        return Some(Err(format!("coild: {err}")));
    }
    let node = v["node"].as_str().unwrap_or("").to_string();
    let steps = serde_json::from_value(v["steps"].clone()).unwrap_or_default();
    Some(Ok((node, steps)))
}

/// `coilctl node health`: asks coild over its socket; returns the exit
/// code (0 healthy, 1 unhealthy, 3 no answer).
pub fn health(args: &StoreArgs, json_out: bool) -> i32 {
    let cfg = match args.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("coilctl: {e}");
            return exit::USAGE;
        }
    };
    let ask = || -> Result<coil::api::Health, String> {
        let mut s = std::os::unix::net::UnixStream::connect(&cfg.socket)
            .map_err(|e| format!("coild does not answer on {}: {e}", cfg.socket.display()))?;
        let t = Some(Duration::from_secs(5));
        s.set_read_timeout(t)
            .and_then(|_| s.set_write_timeout(t))
            .map_err(|e| format!("socket timeouts: {e}"))?;
        let body = serde_json::to_vec(&coil::api::SocketRequest::Health {}).unwrap_or_default();
        s.write_all(&body)
            .and_then(|_| s.shutdown(std::net::Shutdown::Write))
            .map_err(|e| format!("sending to coild: {e}"))?;
        let mut out = Vec::new();
        (&mut s)
            .take(coil::api::MAX_ANSWER as u64)
            .read_to_end(&mut out)
            .map_err(|e| format!("reading coild's answer: {e}"))?;
        serde_json::from_slice(&out).map_err(|e| format!("coild gave no valid answer: {e}"))
    };
    match ask() {
        Ok(h) => {
            if json_out {
                println!("{}", serde_json::to_string(&h).unwrap_or_default());
            } else if h.healthy {
                println!(
                    "coild on {} is healthy (store {}, {} free addresses)",
                    h.node,
                    if h.store_reachable {
                        "reachable"
                    } else {
                        "unreachable"
                    },
                    h.free_addresses
                );
            } else {
                println!("coild on {} is NOT healthy: {}", h.node, h.journal);
            }
            if h.healthy {
                exit::OK
            } else {
                exit::PROBLEMS
            }
        }
        Err(e) => {
            eprintln!("coilctl: {e}");
            exit::UNAVAILABLE
        }
    }
}

fn read_boot_id(p: &Path) -> Result<String, String> {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("reading the boot id from {}: {e}", p.display()))
}

/// Runs `node repair`; returns the exit code.
pub fn run(args: &StoreArgs, opts: RepairOpts) -> i32 {
    let cfg = match args.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("coilctl: {e}");
            return exit::USAGE;
        }
    };
    if !opts.rebuild {
        match via_coild(&cfg.socket, opts.dry_run) {
            Some(Ok((node, steps))) => {
                if let Some(n) = &opts.node {
                    if n != &node {
                        eprintln!(
                            "coilctl: this node's coild serves {node}, not {n}: run node repair on {n} itself"
                        );
                        return exit::USAGE;
                    }
                }
                return print(&opts, &node, "through coild", &steps, Value::Null);
            }
            Some(Err(e)) => {
                eprintln!("coilctl: {e}");
                return exit::UNAVAILABLE;
            }
            None => {}
        }
    }
    let rt = match crate::runtime("coilctl", true) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(offline(&cfg, &opts)) {
        Ok(code) => code,
        Err((msg, code)) => {
            eprintln!("coilctl: {msg}");
            code
        }
    }
}

type Fail = (String, i32);

async fn offline(cfg: &StoreConfig, opts: &RepairOpts) -> Result<i32, Fail> {
    let boot_id = read_boot_id(&opts.boot_id_file).map_err(|e| (e, exit::PROBLEMS))?;
    let kernel = Kernel::new(opts.table_id, opts.protocol_id)
        .map_err(|e| (format!("netlink: {e}"), exit::PROBLEMS))?;
    if opts.rebuild {
        if cfg.kind == StoreKind::Embedded {
            return Err((
                "--rebuild needs the etcd store: in embedded mode the store lives in the \
                 journal being rebuilt; restore the journal from a backup instead"
                    .into(),
                exit::USAGE,
            ));
        }
        let node = opts
            .node
            .clone()
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|s| s.trim().to_string())
            })
            .unwrap_or_default();
        let b = EtcdBackend::connect(&cfg.etcd)
            .await
            .map_err(|e| (e.to_string(), exit::UNAVAILABLE))?;
        let store = Store::open(b, &cfg.prefix)
            .await
            .map_err(|e| (e.to_string(), e.exit_code()))?;
        if let Ok(j) = Journal::open(&cfg.journal_dir) {
            // Not locked: make sure it is closed before it is moved aside.
            drop(j);
        } else if let Err(JournalError::Locked { .. }) = Journal::open(&cfg.journal_dir) {
            return Err((
                format!(
                    "the journal {} is locked: stop coild before --rebuild",
                    cfg.journal_dir.display()
                ),
                exit::UNAVAILABLE,
            ));
        }
        let report =
            coil_recovery::rebuild::rebuild(&cfg.journal_dir, &store, &kernel, &node, &boot_id)
                .await
                .map_err(|e| (format!("rebuild: {e}"), exit::PROBLEMS))?;
        let extra = serde_json::to_value(&report).unwrap_or(Value::Null);
        let j =
            Arc::new(Journal::open(&cfg.journal_dir).map_err(|e| (e.to_string(), exit::PROBLEMS))?);
        let code = run_recovery(&j, &store, &kernel, &node, &boot_id, opts, "rebuilt", extra).await;
        close(j);
        return Ok(code);
    }
    if !cfg.journal_dir.join("LOCK").exists() && !cfg.journal_dir.join("CHECKPOINT").exists() {
        return Err((
            format!(
                "no journal at {} (and no coild answering at {}); use --journal-dir, or \
                 --rebuild to create one from the store and the kernel",
                cfg.journal_dir.display(),
                cfg.socket.display()
            ),
            exit::USAGE,
        ));
    }
    let j = match Journal::open(&cfg.journal_dir) {
        Ok(j) => Arc::new(j),
        Err(e @ JournalError::Locked { .. }) => {
            return Err((
                format!(
                    "{e}, but coild's socket {} does not answer",
                    cfg.socket.display()
                ),
                exit::UNAVAILABLE,
            ))
        }
        Err(e) => {
            return Err((
                format!(
                    "{e}; if the journal is lost or corrupt, `coilctl node repair --rebuild` \
                     rebuilds it from the store and the kernel"
                ),
                exit::PROBLEMS,
            ))
        }
    };
    let node = j
        .node_meta()
        .ok()
        .flatten()
        .map(|m| m.node_name)
        .or_else(|| opts.node.clone())
        .unwrap_or_default();
    if let Some(n) = &opts.node {
        if n != &node {
            close(j);
            return Err((
                format!("this journal belongs to {node}, not {n}: run node repair on {n} itself"),
                exit::USAGE,
            ));
        }
    }
    let backend = match cfg.kind {
        StoreKind::Embedded => AnyBackend::Embedded(Arc::new(
            EmbeddedBackend::open(j.clone()).map_err(|e| (e.to_string(), exit::PROBLEMS))?,
        )),
        StoreKind::Etcd => AnyBackend::Etcd(Box::new(
            EtcdBackend::connect(&cfg.etcd)
                .await
                .map_err(|e| (e.to_string(), exit::UNAVAILABLE))?,
        )),
    };
    let store = Store::open_lazy(backend, &cfg.prefix).map_err(|e| (e.to_string(), exit::USAGE))?;
    let code = run_recovery(
        &j,
        &store,
        &kernel,
        &node,
        &boot_id,
        opts,
        "offline",
        Value::Null,
    )
    .await;
    drop(store);
    close(j);
    Ok(code)
}

fn close(j: Arc<Journal>) {
    if let Ok(j) = Arc::try_unwrap(j) {
        if let Err(e) = j.close() {
            eprintln!("coilctl: closing the journal: {e}");
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_recovery<B: Backend>(
    j: &Arc<Journal>,
    store: &Store<B>,
    kernel: &Kernel,
    node: &str,
    boot_id: &str,
    opts: &RepairOpts,
    mode: &str,
    extra: Value,
) -> i32 {
    let cx = coil_recovery::Context {
        journal: j,
        store,
        kernel,
        node,
        boot_id,
        mtu: opts.mtu,
        full_scan: true,
        store_scan: true,
        hold_exports: false,
    };
    match coil_recovery::recover(&cx, opts.dry_run).await {
        Ok((_, out)) => {
            if !opts.dry_run && !out.is_empty() {
                // Record the boot this repair ran in, as coild would.
                if let Ok(Some(mut m)) = j.node_meta() {
                    m.boot_id = boot_id.to_string();
                    let mut b = coil::journal::Batch::new();
                    b.put_node_meta(&m);
                    let _ = j.commit(b);
                }
            }
            let steps: Vec<Step> = out.into_iter().map(Step::from_outcome).collect();
            print(opts, node, mode, &steps, extra)
        }
        Err(e) => {
            eprintln!("coilctl: node repair: {e}");
            exit::PROBLEMS
        }
    }
}
