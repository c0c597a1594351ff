//! `coilctl`: the administrator's command line.
//!
//! Pool, node, address and block commands talk to the cluster store (etcd,
//! or the embedded store in a node's journal); `journal dump` and `journal
//! verify` work offline on a node's journal directory with coild stopped.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};
use coil::exit;
use coil::journal::{
    AttachmentState, Dump, IntentOp, IntentState, Journal, JournalError, JournalOptions,
    LeaseState, RecoveryMode, VerifyReport,
};
use serde_json::{json, Value};

use crate::ctl_config::StoreArgs;
use crate::ctl_store::{self, StoreCmd};
use crate::output::Table;

/// Default location of a node's journal.
pub const DEFAULT_JOURNAL_DIR: &str = "/var/lib/coil/journal";

#[derive(Parser, Debug)]
#[command(
    name = "coilctl",
    version,
    about = "Administer coil: pools, nodes, blocks, addresses and node journals",
    after_help = "Store configuration: flags, then COILCTL_* environment, then the YAML \
                  file given by --config (default ~/.coilctl.yml), then defaults.\n\
                  Exit codes: 0 ok, 1 the command failed or found problems, 2 bad input, \
                  3 store unreachable or busy (retry later)."
)]
struct Cli {
    #[command(flatten)]
    store: StoreArgs,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Address pools and their subnets.
    Pool {
        #[command(subcommand)]
        cmd: PoolCmd,
    },
    /// Nodes: liveness and leased blocks.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Look up addresses.
    Address {
        #[command(subcommand)]
        cmd: AddressCmd,
    },
    /// Administer block leases.
    Block {
        #[command(subcommand)]
        cmd: BlockCmd,
    },
    /// Check the cluster store itself.
    Store {
        #[command(subcommand)]
        cmd: StoreCheckCmd,
    },
    /// Inspect a node's write-ahead journal offline (coild stopped).
    Journal {
        #[command(subcommand)]
        cmd: JournalCmd,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion { shell: clap_complete::Shell },
}

#[derive(Subcommand, Debug)]
enum PoolCmd {
    /// Create a pool: `pool create NAME SUBNET... --block-size N` (or v1's
    /// `pool create NAME SUBNET SIZE`). A pool named like a namespace serves
    /// that namespace; `default` serves the rest. With IPv4 and IPv6
    /// subnets (`--ipv6 SUBNET`) the pool is dual-stack: each pod gets one
    /// address of each family.
    Create {
        name: String,
        /// Subnets (CIDR); v1's trailing SIZE is accepted.
        #[arg(required = true, value_name = "SUBNET")]
        args: Vec<String>,
        /// log2 of the addresses per block (5 = 32 addresses).
        #[arg(long, short = 's')]
        block_size: Option<u8>,
        /// An IPv6 subnet of a dual-stack pool (repeatable).
        #[arg(long, value_name = "SUBNET")]
        ipv6: Vec<String>,
        /// log2 of the addresses per IPv6 block (default: --block-size).
        #[arg(long, value_name = "N")]
        ipv6_block_size: Option<u8>,
    },
    /// Add a subnet to a pool. A subnet of a family the pool lacks makes
    /// it dual-stack (its pods from then on get an address of each
    /// family) and needs --block-size for that family's blocks.
    AddSubnet {
        name: String,
        subnet: String,
        /// log2 of the addresses per block of a family new to the pool.
        #[arg(long, short = 's')]
        block_size: Option<u8>,
    },
    /// Remove a pool (refused while blocks are leased).
    Remove {
        name: String,
        /// Also release its leased blocks, if no address in them is in use.
        #[arg(long)]
        force: bool,
    },
    /// Show a pool: subnets, leased and free blocks, by node.
    Show { name: String },
    /// List pools.
    List,
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// List nodes with their liveness and block counts.
    List,
    /// List the blocks a node leases.
    Blocks { node: String },
    /// Remove a node that is gone for good (powered off, deleted): records
    /// its removal fence and frees its blocks in one transaction. Refused
    /// while the node's liveness key exists. Its addresses may then be
    /// handed to other nodes: be sure its pods are gone.
    Remove {
        node: String,
        /// Remove it even though its liveness key exists (it is alive, or
        /// was moments ago): if its pods still run, their addresses may be
        /// handed out twice.
        #[arg(long)]
        force: bool,
    },
    /// Lift a node's removal fence so it may lease blocks again (after
    /// its old pods are gone: rebooted, or its journal rebuilt).
    Readmit { node: String },
    /// Ask this node's coild whether it can serve (its journal accepts
    /// commits); exit 0 when healthy, 1 when not, 3 when coild does not
    /// answer. The DaemonSet's liveness probe.
    Health,
    /// Bring this node's journal, the store and the kernel back into
    /// agreement (through coild when it runs; directly when it is stopped).
    Repair {
        /// The node (must be this one) [default: this node].
        node: Option<String>,
        /// Print the plan without applying it.
        #[arg(long)]
        dry_run: bool,
        /// Rebuild a lost or corrupt journal from the store and the kernel
        /// (coild stopped; the old journal is moved aside).
        #[arg(long)]
        rebuild: bool,
        /// coild's routing table id.
        #[arg(long, default_value_t = 119)]
        table_id: u32,
        /// coild's route protocol id.
        #[arg(long, default_value_t = 30)]
        protocol_id: u8,
        /// Pod MTU used when re-wiring.
        #[arg(long, default_value_t = 1500)]
        mtu: u32,
        /// Where the kernel boot id is read.
        #[arg(long, default_value = "/proc/sys/kernel/random/boot_id")]
        boot_id_file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum AddressCmd {
    /// Which pool, block, node and container an address belongs to.
    Info { address: String },
}

#[derive(Subcommand, Debug)]
enum BlockCmd {
    /// Release a block leased by NODE (refused while NODE is alive).
    Release {
        /// The node that holds the lease.
        #[arg(long)]
        node: String,
        /// The block, like 10.64.0.32/27.
        block: String,
        /// Release even though the node is alive.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum StoreCheckCmd {
    /// List every bad entry under the prefix (a value that fails to decode
    /// or to validate against its key or pool, or a key outside coil's
    /// layout); exit 1 if there is one.
    Check,
}

#[derive(Subcommand, Debug)]
enum JournalCmd {
    /// Print every record of the journal.
    Dump {
        /// The journal directory.
        #[arg(long, default_value = DEFAULT_JOURNAL_DIR)]
        dir: PathBuf,
    },
    /// Check every record and their cross-references; exit 1 on any problem.
    Verify {
        #[arg(long, default_value = DEFAULT_JOURNAL_DIR)]
        dir: PathBuf,
        /// Treat a torn WAL tail as a problem too.
        #[arg(long)]
        strict: bool,
    },
}

/// Runs coilctl with `args` (args[0] is the program name).
pub fn main(args: Vec<OsString>) -> i32 {
    init_logging();
    let cli: Cli = match crate::parse_args(args) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let json = cli.json;
    let parsed: Result<StoreCmd, String> = match cli.cmd {
        Cmd::Journal { cmd } => {
            return match cmd {
                JournalCmd::Dump { dir } => journal_dump(dir, json),
                JournalCmd::Verify { dir, strict } => journal_verify(dir, json, strict),
            }
        }
        Cmd::Completion { shell } => {
            let mut c = Cli::command();
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut c, "coilctl", &mut buf);
            use std::io::Write;
            return match std::io::stdout().write_all(&buf) {
                Ok(()) => exit::OK,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => exit::OK,
                Err(e) => {
                    eprintln!("coilctl: writing completions: {e}");
                    exit::PROBLEMS
                }
            };
        }
        Cmd::Node {
            cmd: NodeCmd::Health,
        } => return crate::ctl_repair::health(&cli.store, json),
        Cmd::Node {
            cmd:
                NodeCmd::Repair {
                    node,
                    dry_run,
                    rebuild,
                    table_id,
                    protocol_id,
                    mtu,
                    boot_id_file,
                },
        } => {
            if let Some(n) = &node {
                if let Err(e) = ctl_store::parse_node_name(n) {
                    eprintln!("coilctl: {e}");
                    return exit::USAGE;
                }
            }
            return crate::ctl_repair::run(
                &cli.store,
                crate::ctl_repair::RepairOpts {
                    node,
                    dry_run,
                    rebuild,
                    json,
                    table_id,
                    protocol_id,
                    mtu,
                    boot_id_file,
                },
            );
        }
        Cmd::Pool { cmd } => match cmd {
            PoolCmd::Create {
                name,
                args,
                block_size,
                ipv6,
                ipv6_block_size,
            } => ctl_store::parse_create(
                &name,
                &args,
                block_size,
                &ctl_store::Ipv6Args {
                    subnets: ipv6,
                    block_size: ipv6_block_size,
                },
            ),
            PoolCmd::AddSubnet {
                name,
                subnet,
                block_size,
            } => ctl_store::parse_pool_name(&name).and_then(|n| {
                Ok(StoreCmd::AddSubnet(
                    n,
                    ctl_store::parse_new_subnet(&subnet)?,
                    block_size,
                ))
            }),
            PoolCmd::Remove { name, force } => {
                ctl_store::parse_pool_name(&name).map(|n| StoreCmd::RemovePool(n, force))
            }
            PoolCmd::Show { name } => ctl_store::parse_pool_name(&name).map(StoreCmd::ShowPool),
            PoolCmd::List => Ok(StoreCmd::ListPools),
        },
        Cmd::Node { cmd } => match cmd {
            NodeCmd::List => Ok(StoreCmd::ListNodes),
            NodeCmd::Blocks { node } => ctl_store::parse_node_name(&node).map(StoreCmd::NodeBlocks),
            NodeCmd::Remove { node, force } => {
                ctl_store::parse_node_name(&node).map(|n| StoreCmd::RemoveNode(n, force))
            }
            NodeCmd::Readmit { node } => {
                ctl_store::parse_node_name(&node).map(StoreCmd::ReadmitNode)
            }
            NodeCmd::Repair { .. } | NodeCmd::Health => Err("unreachable".into()),
        },
        Cmd::Address {
            cmd: AddressCmd::Info { address },
        } => ctl_store::parse_address(&address).map(StoreCmd::AddressInfo),
        Cmd::Store {
            cmd: StoreCheckCmd::Check,
        } => Ok(StoreCmd::Check),
        Cmd::Block {
            cmd: BlockCmd::Release { node, block, force },
        } => ctl_store::parse_node_name(&node).and_then(|node| {
            Ok(StoreCmd::ReleaseBlock {
                node,
                block: ctl_store::parse_block(&block)?,
                force,
            })
        }),
    };
    match parsed {
        Ok(cmd) => ctl_store::run(&cli.store, json, cmd),
        Err(e) => {
            eprintln!("coilctl: {e}");
            exit::USAGE
        }
    }
}

fn open_ro(dir: &PathBuf, strict: bool) -> Result<Journal, JournalError> {
    Journal::open_with(
        dir,
        JournalOptions {
            read_only: true,
            recovery: if strict {
                RecoveryMode::Strict
            } else {
                RecoveryMode::TolerateTornTail
            },
            ..Default::default()
        },
    )
}

/// Maps an open failure to an exit code: damage is a finding (1), a missing
/// journal is bad input (2), a busy or unreadable one is "try again" (3).
fn open_failure(e: &JournalError) -> i32 {
    match e {
        JournalError::NotFound { .. } => exit::USAGE,
        JournalError::NewerFormat { .. } | JournalError::OlderFormat { .. } => exit::PROBLEMS,
        e if e.is_corruption() => exit::PROBLEMS,
        _ => exit::UNAVAILABLE,
    }
}

fn journal_dump(dir: PathBuf, as_json: bool) -> i32 {
    let j = match open_ro(&dir, false) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("coilctl journal dump: {e}");
            return open_failure(&e);
        }
    };
    let d = j.dump();
    if as_json {
        println!("{}", dump_json(&j, &d));
    } else {
        print!("{}", dump_text(&j, &d));
    }
    if d.corrupt.is_empty() {
        exit::OK
    } else {
        exit::PROBLEMS
    }
}

fn journal_verify(dir: PathBuf, as_json: bool, strict: bool) -> i32 {
    let j = match open_ro(&dir, strict) {
        Ok(j) => j,
        Err(e) => {
            if as_json {
                println!(
                    "{}",
                    json!({"dir": dir, "ok": false, "open_error": e.to_string()})
                );
            } else {
                eprintln!("coilctl journal verify: {e}");
            }
            return open_failure(&e);
        }
    };
    let r = j.verify();
    if as_json {
        println!("{}", verify_json(&j, &r));
    } else {
        print!("{}", verify_text(&j, &r));
    }
    if r.is_clean() {
        exit::OK
    } else {
        exit::PROBLEMS
    }
}

fn lease_state(s: LeaseState) -> &'static str {
    match s {
        LeaseState::Acquiring => "acquiring",
        LeaseState::Leased => "leased",
        LeaseState::Releasing => "releasing",
        LeaseState::Quarantined => "quarantined",
    }
}

fn att_state(s: AttachmentState) -> &'static str {
    match s {
        AttachmentState::Reserved => "reserved",
        AttachmentState::Wired => "wired",
        AttachmentState::Releasing => "releasing",
    }
}

fn intent_state(s: &IntentState) -> String {
    match s {
        IntentState::Pending => "pending".into(),
        IntentState::Done => "done".into(),
        IntentState::Aborted { reason } => format!("aborted: {reason}"),
    }
}

fn intent_op(op: &IntentOp) -> String {
    match op {
        IntentOp::AcquireBlock { pool, block } => match block {
            Some(b) => format!("acquire-block pool={pool} block={b}"),
            None => format!("acquire-block pool={pool}"),
        },
        IntentOp::ReleaseBlock { pool, block } => {
            format!("release-block pool={pool} block={block}")
        }
        IntentOp::Wire { key } => format!("wire {key}"),
        IntentOp::Unwire { key } => format!("unwire {key}"),
        IntentOp::ExportBlock { block } => format!("export-block {block}"),
        IntentOp::WithdrawBlock { block } => format!("withdraw-block {block}"),
    }
}

fn header(j: &Journal, d: &Dump) -> String {
    let s = &d.stats;
    format!(
        "journal {}\n  last seq {}, checkpoint seq {}, {} WAL segment(s), {} WAL bytes\n",
        j.dir().display(),
        s.last_seq,
        s.checkpoint_seq,
        s.wal_segments,
        s.wal_bytes
    )
}

fn dump_text(j: &Journal, d: &Dump) -> String {
    let mut out = header(j, d);
    match &d.node {
        Some(n) => out.push_str(&format!(
            "  node {} (boot {}, cluster {}, created {})\n",
            n.node_name, n.boot_id, n.cluster_id, n.created_unix
        )),
        None => out.push_str("  node: not initialised\n"),
    }
    out.push_str(&format!("\nLEASES ({})\n", d.leases.len()));
    let mut t = Table::new(&["POOL", "BLOCK", "EPOCH", "STATE", "CURSOR"]);
    for l in &d.leases {
        t.row(vec![
            l.pool.clone(),
            l.block.to_string(),
            l.epoch.to_string(),
            lease_state(l.state).into(),
            l.alloc_cursor.to_string(),
        ]);
    }
    out.push_str(&t.render());
    out.push_str(&format!("\nATTACHMENTS ({})\n", d.attachments.len()));
    let mut t = Table::new(&[
        "NETWORK",
        "CONTAINER",
        "IFNAME",
        "POD",
        "POOL",
        "ADDRESSES",
        "STATE",
        "VETH",
    ]);
    for a in &d.attachments {
        t.row(vec![
            if a.key.is_legacy() {
                "(format 1)".into()
            } else {
                a.key.network.clone()
            },
            a.key.container_id.clone(),
            a.key.ifname.clone(),
            format!("{}/{}", a.pod_namespace, a.pod_name),
            a.pool.clone(),
            a.addresses
                .iter()
                .map(|x| x.addr.to_string())
                .collect::<Vec<_>>()
                .join(","),
            att_state(a.state).into(),
            a.host_veth.clone(),
        ]);
    }
    out.push_str(&t.render());
    out.push_str(&format!(
        "\nINTENTS ({}, high-water mark {})\n",
        d.intents.len(),
        d.intent_hwm
    ));
    let mut t = Table::new(&["ID", "STATE", "OP"]);
    for i in &d.intents {
        t.row(vec![
            i.id.to_string(),
            intent_state(&i.state),
            intent_op(&i.op),
        ]);
    }
    out.push_str(&t.render());
    out.push_str(&format!("\nADDRESSES ({})\n", d.addresses.len()));
    let mut t = Table::new(&["ADDRESS", "BLOCK", "OWNER"]);
    for (a, e) in &d.addresses {
        t.row(vec![
            a.to_string(),
            e.block.to_string(),
            e.attachment.to_string(),
        ]);
    }
    out.push_str(&t.render());
    if !d.corrupt.is_empty() {
        out.push_str(&format!("\nCORRUPT ({})\n", d.corrupt.len()));
        let mut t = Table::new(&["KEY", "REASON"]);
        for c in &d.corrupt {
            t.row(vec![c.key.clone(), c.reason.clone()]);
        }
        out.push_str(&t.render());
    }
    out
}

fn dump_json(j: &Journal, d: &Dump) -> Value {
    json!({
        "dir": j.dir(),
        "stats": {
            "last_seq": d.stats.last_seq,
            "checkpoint_seq": d.stats.checkpoint_seq,
            "wal_segments": d.stats.wal_segments,
            "wal_bytes": d.stats.wal_bytes,
        },
        "node": d.node.as_ref().map(|n| json!({
            "node_name": n.node_name,
            "boot_id": n.boot_id,
            "cluster_id": n.cluster_id,
            "created_unix": n.created_unix,
        })),
        "intent_hwm": d.intent_hwm,
        "leases": d.leases.iter().map(|l| json!({
            "pool": l.pool,
            "block": l.block.to_string(),
            "epoch": l.epoch,
            "state": lease_state(l.state),
            "alloc_cursor": l.alloc_cursor,
        })).collect::<Vec<_>>(),
        "attachments": d.attachments.iter().map(|a| json!({
            "container_id": a.key.container_id,
            "ifname": a.key.ifname,
            "netns": a.netns,
            "pod_namespace": a.pod_namespace,
            "pod_name": a.pod_name,
            "pool": a.pool,
            "addresses": a.addresses.iter().map(|x| json!({
                "address": x.addr.to_string(),
                "block": x.block.to_string(),
            })).collect::<Vec<_>>(),
            "host_veth": a.host_veth,
            "state": att_state(a.state),
            "boot_id": a.boot_id,
            "created_unix": a.created_unix,
        })).collect::<Vec<_>>(),
        "intents": d.intents.iter().map(|i| json!({
            "id": i.id,
            "state": intent_state(&i.state),
            "op": intent_op(&i.op),
            "created_unix": i.created_unix,
        })).collect::<Vec<_>>(),
        "addresses": d.addresses.iter().map(|(a, e)| json!({
            "address": a.to_string(),
            "block": e.block.to_string(),
            "container_id": e.attachment.container_id,
            "ifname": e.attachment.ifname,
        })).collect::<Vec<_>>(),
        "corrupt": d.corrupt.iter().map(|c| json!({"key": c.key, "reason": c.reason})).collect::<Vec<_>>(),
    })
}

fn verify_text(j: &Journal, r: &VerifyReport) -> String {
    let mut out = format!(
        "journal {}: {} records checked\n",
        j.dir().display(),
        r.records
    );
    for t in &r.torn_tails {
        out.push_str(&format!(
            "note: torn WAL tail at {}@{} ({} bytes, {}): a write in flight at a crash, never acknowledged; coild cuts it off when it opens the journal\n",
            t.segment.display(),
            t.offset,
            t.dropped_bytes,
            t.reason
        ));
    }
    for c in &r.corrupt {
        out.push_str(&format!("CORRUPT {}: {}\n", c.key, c.reason));
    }
    for i in &r.inconsistent {
        out.push_str(&format!("INCONSISTENT {i}\n"));
    }
    if r.is_clean() {
        out.push_str("ok: every record is intact and consistent\n");
    } else {
        out.push_str(&format!(
            "FAILED: {} corrupt, {} inconsistent; repair with `coilctl node repair --rebuild`\n",
            r.corrupt.len(),
            r.inconsistent.len()
        ));
    }
    out
}

fn verify_json(j: &Journal, r: &VerifyReport) -> Value {
    json!({
        "dir": j.dir(),
        "ok": r.is_clean(),
        "records": r.records,
        "corrupt": r.corrupt.iter().map(|c| json!({"key": c.key, "reason": c.reason})).collect::<Vec<_>>(),
        "inconsistent": r.inconsistent,
        "torn_tails": r.torn_tails.iter().map(|t| json!({
            "segment": t.segment,
            "offset": t.offset,
            "dropped_bytes": t.dropped_bytes,
            "reason": t.reason,
        })).collect::<Vec<_>>(),
        "stats": {
            "last_seq": r.stats.last_seq,
            "checkpoint_seq": r.stats.checkpoint_seq,
            "wal_segments": r.stats.wal_segments,
            "wal_bytes": r.stats.wal_bytes,
        },
    })
}

/// Sends the libraries' diagnostics (for example a journal checkpoint that
/// failed) to stderr; `COIL_LOG` sets the filter (default `warn`).
pub(crate) fn init_logging() {
    init_logging_with("warn");
}

/// Logs go to stderr (never stdout), filtered by `COIL_LOG`; `COIL_LOG_JSON=1`
/// switches to JSON lines.
pub(crate) fn init_logging_with(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COIL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    let _ = if std::env::var("COIL_LOG_JSON").as_deref() == Ok("1") {
        b.json().try_init()
    } else {
        b.try_init()
    };
}
