//! `coild`, the node daemon: the journal, the allocator, kernel wiring,
//! block leases in the store, and the socket the `coil` plugin talks to.
//!
//! Configuration: flags, then `COILD_*` environment, then a YAML file
//! (`--config`, default /etc/coil/coild.yml when it exists), then defaults.

mod daemon;
mod server;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{pem_file, split_endpoints, EtcdSettings};
use clap::Parser;
use coil::exit;
use serde::Deserialize;

pub use daemon::{open_journal, Daemon, DaemonConfig, EngineChoice, StoreChoice};
pub use server::serve;

#[derive(Parser, Debug, Default)]
#[command(name = "coild", version, about = "coil's node daemon")]
struct Args {
    /// YAML config file [default: /etc/coil/coild.yml if it exists].
    #[arg(long, env = "COILD_CONFIG")]
    config: Option<PathBuf>,
    /// This node's name [default: the hostname].
    #[arg(long, env = "COILD_NODE_NAME")]
    node_name: Option<String>,
    /// Cluster store: etcd (a cluster) or embedded (one host, no etcd).
    /// Required: a node that silently used its own store would hand out
    /// addresses other nodes also hand out.
    #[arg(long, env = "COILD_STORE", value_parser = ["etcd", "embedded"])]
    store: Option<String>,
    /// Comma-separated etcd endpoints.
    #[arg(long, env = "COILD_ETCD_ENDPOINTS")]
    etcd_endpoints: Option<String>,
    #[arg(long, env = "COILD_ETCD_PREFIX")]
    etcd_prefix: Option<String>,
    /// Deadline of each etcd request, like 2s or 500ms.
    #[arg(long, env = "COILD_ETCD_TIMEOUT")]
    etcd_timeout: Option<String>,
    #[arg(long, env = "COILD_ETCD_USERNAME")]
    etcd_username: Option<String>,
    #[arg(long, env = "COILD_ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<String>,
    #[arg(long, env = "COILD_ETCD_TLS_CA")]
    etcd_tls_ca: Option<PathBuf>,
    #[arg(long, env = "COILD_ETCD_TLS_CERT")]
    etcd_tls_cert: Option<PathBuf>,
    #[arg(long, env = "COILD_ETCD_TLS_KEY")]
    etcd_tls_key: Option<PathBuf>,
    /// Routing table the node's blocks are published in [default: 119].
    #[arg(long, env = "COILD_TABLE_ID")]
    table_id: Option<u32>,
    /// Route protocol id marking coil's routes [default: 30].
    #[arg(long, env = "COILD_PROTOCOL_ID")]
    protocol_id: Option<u8>,
    /// MTU of pod veths [default: 1500].
    #[arg(long, env = "COILD_MTU")]
    mtu: Option<u32>,
    /// The plugin's socket [default: /run/coild.sock].
    #[arg(long, env = "COILD_SOCKET")]
    socket: Option<PathBuf>,
    /// State directory; the journal lives in <dir>/journal [default: /var/lib/coil].
    #[arg(long, env = "COILD_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Where the kernel boot id is read [default: /proc/sys/kernel/random/boot_id].
    #[arg(long, env = "COILD_BOOT_ID_FILE")]
    boot_id_file: Option<PathBuf>,
    /// TTL of the node's liveness lease, like 30s; kept alive every third
    /// of it [default: 30s].
    #[arg(long, env = "COILD_LIVENESS_TTL")]
    liveness_ttl: Option<String>,
    /// How often to resync table 119, host routes and leases [default: 30s].
    #[arg(long, env = "COILD_RESYNC_INTERVAL")]
    resync_interval: Option<String>,
    /// Blocks to keep even when empty [default: 1].
    #[arg(long, env = "COILD_MIN_BLOCKS")]
    min_blocks: Option<usize>,
    /// Serve Prometheus metrics on this address (opt-in; keep it on loopback).
    #[arg(long, env = "COILD_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Post Kubernetes Events on this node's Node (lease lost, quarantine,
    /// re-admission, pool exhausted). The client is configured from
    /// `--kubeconfig`, else `KUBECONFIG` or `~/.kube/config`, else the
    /// in-cluster service account.
    #[arg(long, env = "COILD_KUBE")]
    kube: bool,
    /// Kubeconfig for `--kube` (implies it).
    #[arg(long, env = "COILD_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// What decides: `machine` (the I/O-free node machine, driven
    /// persist-then-act) or `direct` (the earlier request handlers, kept
    /// as a fallback) [default: machine].
    #[arg(long, env = "COILD_ENGINE", value_parser = ["direct", "machine"])]
    engine: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    node_name: Option<String>,
    store: Option<String>,
    etcd_endpoints: Option<Vec<String>>,
    etcd_prefix: Option<String>,
    etcd_timeout: Option<String>,
    etcd_username: Option<String>,
    etcd_password: Option<String>,
    etcd_tls_ca: Option<PathBuf>,
    etcd_tls_cert: Option<PathBuf>,
    etcd_tls_key: Option<PathBuf>,
    table_id: Option<u32>,
    protocol_id: Option<u8>,
    mtu: Option<u32>,
    socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    boot_id_file: Option<PathBuf>,
    liveness_ttl: Option<String>,
    resync_interval: Option<String>,
    min_blocks: Option<usize>,
    metrics_addr: Option<std::net::SocketAddr>,
    engine: Option<String>,
}

fn hostname() -> String {
    nix_hostname().unwrap_or_else(|| "localhost".into())
}

fn nix_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

impl Args {
    fn resolve(self) -> Result<DaemonConfig, String> {
        let file: FileConfig = crate::config::load_yaml(
            self.config.as_deref(),
            Some(std::path::Path::new("/etc/coil/coild.yml")),
        )?;
        let store = match self.store.or(file.store).as_deref() {
            Some("etcd") => {
                let given = EtcdSettings {
                    endpoints: self.etcd_endpoints.as_deref().map(split_endpoints),
                    prefix: self.etcd_prefix,
                    timeout: self.etcd_timeout,
                    username: self.etcd_username,
                    password: self.etcd_password,
                    tls_ca: pem_file(self.etcd_tls_ca),
                    tls_cert: pem_file(self.etcd_tls_cert),
                    tls_key: pem_file(self.etcd_tls_key),
                };
                let from_file = EtcdSettings {
                    endpoints: file.etcd_endpoints,
                    prefix: file.etcd_prefix,
                    timeout: file.etcd_timeout,
                    username: file.etcd_username,
                    password: file.etcd_password,
                    tls_ca: pem_file(file.etcd_tls_ca),
                    tls_cert: pem_file(file.etcd_tls_cert),
                    tls_key: pem_file(file.etcd_tls_key),
                };
                let etcd = given
                    .over(from_file)
                    .resolve(Err("--store etcd needs --etcd-endpoints"))?;
                StoreChoice::Etcd {
                    opts: etcd.options,
                    prefix: etcd.prefix,
                }
            }
            Some("embedded") => StoreChoice::Embedded,
            Some(other) => return Err(format!("unknown store {other:?}: use etcd or embedded")),
            None => {
                return Err(
                    "choose a store: --store etcd --etcd-endpoints URLS (a cluster) or \
                     --store embedded (a single host)"
                        .into(),
                )
            }
        };
        let node_name = self.node_name.or(file.node_name).unwrap_or_else(hostname);
        coil::store::model::validate_node_name(&node_name).map_err(|e| e.to_string())?;
        let ttl = match self.liveness_ttl.or(file.liveness_ttl) {
            Some(t) => crate::config::parse_duration(&t)?,
            // A keep-alive every 10 s: 0.1 message/s per idle node, so
            // liveness stays within the load an idle node may put on etcd
            // (0.2 requests/s). Nothing is freed on liveness expiry (only
            // a node's removal frees its blocks); a longer TTL only makes
            // the controller note an unreachable node later.
            None => Duration::from_secs(30),
        };
        let mtu = self.mtu.or(file.mtu).unwrap_or(1500);
        if !(576..=65535).contains(&mtu) {
            return Err(format!("MTU {mtu} out of range 576..=65535"));
        }
        let table_id = self.table_id.or(file.table_id).unwrap_or(119);
        if table_id == 0 || table_id == 253 || table_id == 254 || table_id == 255 {
            return Err(format!("table id {table_id} is reserved by the kernel"));
        }
        let state_dir = self
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/coil"));
        Ok(DaemonConfig {
            node_name,
            store,
            table_id,
            protocol_id: self.protocol_id.or(file.protocol_id).unwrap_or(30),
            mtu,
            socket: self
                .socket
                .or(file.socket)
                .unwrap_or_else(|| PathBuf::from(crate::plugin::DEFAULT_SOCKET)),
            journal_dir: state_dir.join("journal"),
            boot_id_file: self
                .boot_id_file
                .or(file.boot_id_file)
                .unwrap_or_else(|| PathBuf::from("/proc/sys/kernel/random/boot_id")),
            liveness_ttl: ttl,
            pool_cache_ttl: Duration::from_secs(10),
            resync_interval: match self.resync_interval.or(file.resync_interval) {
                Some(t) => crate::config::parse_duration(&t)?,
                None => Duration::from_secs(30),
            },
            min_blocks: self.min_blocks.or(file.min_blocks).unwrap_or(1),
            metrics_addr: self.metrics_addr.or(file.metrics_addr),
            events: crate::kube::EventSink::disabled(),
            engine: match self.engine.or(file.engine).as_deref() {
                None | Some("machine") => EngineChoice::Machine,
                Some("direct") => EngineChoice::Direct,
                Some(other) => {
                    return Err(format!("unknown engine {other:?}: use direct or machine"))
                }
            },
        })
    }
}

/// Runs coild with `args`; returns the exit code.
pub fn main(args: Vec<OsString>) -> i32 {
    crate::coilctl::init_logging_with("info");
    let args: Args = match crate::parse_args(args) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let kube = (args.kube || args.kubeconfig.is_some()).then(|| args.kubeconfig.clone());
    let mut cfg = match args.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("coild: {e}");
            return exit::USAGE;
        }
    };
    let rt = match crate::runtime("coild", true) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        if let Some(kubeconfig) = kube {
            match crate::kube::client(kubeconfig.as_deref()).await {
                Ok(c) => cfg.events = crate::kube::EventSink::start(c, &cfg.node_name),
                Err(e) => {
                    eprintln!("coild: {e}");
                    return exit::USAGE;
                }
            }
        }
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        match daemon::run(cfg, shutdown).await {
            Ok(()) => exit::OK,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("coild: {e}");
                e.exit_code()
            }
        }
    })
}
