//! coilctl's store commands: pools, nodes, addresses, blocks.
//!
//! Every argument is parsed and validated before anything connects, so bad
//! input exits 2 without touching the store; store errors map to exit codes
//! in one place ([`coil::store::StoreError::exit_code`]).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use coil::exit;
use coil::journal::{Journal, JournalError};
use coil::store::embedded::EmbeddedBackend;
use coil::store::model::{self, parse_subnet};
use coil::store::{Backend, BadEntry, BlockLease, Family, Pool, PoolSpec, Store, StoreError};
use coil_adapters::etcd::EtcdBackend;
use coil_adapters::remote::RemoteBackend;
use coil_adapters::AnyBackend;
use ipnet::IpNet;
use serde_json::{json, Value};

use crate::ctl_config::{StoreArgs, StoreConfig, StoreKind};
use crate::output::Table;

/// A store command with its arguments parsed.
#[derive(Debug, Clone)]
pub enum StoreCmd {
    CreatePool(PoolSpec),
    AddSubnet(String, IpNet, Option<u8>),
    RemovePool(String, bool),
    ShowPool(String),
    ListPools,
    ListNodes,
    NodeBlocks(String),
    AddressInfo(IpAddr),
    ReleaseBlock {
        node: String,
        block: IpNet,
        force: bool,
    },
    /// Every bad entry under the prefix (`coilctl store check`).
    Check,
    /// `node remove NODE [--force]`.
    RemoveNode(String, bool),
    /// `node readmit NODE`.
    ReadmitNode(String),
}

fn bad(e: StoreError) -> String {
    e.to_string()
}

/// The IPv6 part of `pool create`: `--ipv6 SUBNET`... and
/// `--ipv6-block-size N`.
#[derive(Debug, Default)]
pub struct Ipv6Args {
    pub subnets: Vec<String>,
    pub block_size: Option<u8>,
}

/// Parses `pool create NAME SUBNET... [--block-size N] [--ipv6 SUBNET]...
/// [--ipv6-block-size N]`, also accepting v1's `pool create NAME SUBNET
/// SIZE`.
pub fn parse_create(
    name: &str,
    args: &[String],
    block_size: Option<u8>,
    ipv6: &Ipv6Args,
) -> Result<StoreCmd, String> {
    let (subnets, bs) = match block_size {
        Some(bs) => (args, bs),
        None => match args.split_last() {
            Some((last, rest)) if !rest.is_empty() && !last.contains('/') => {
                let bs = last
                    .parse::<u8>()
                    .map_err(|_| format!("invalid block size {last:?}: expected 0..=32"))?;
                (rest, bs)
            }
            _ => {
                return Err(
                    "missing block size: use --block-size N (addresses per block = 2^N), \
                     or v1's form: pool create NAME SUBNET SIZE"
                        .into(),
                )
            }
        },
    };
    if subnets.is_empty() {
        return Err("pool create needs at least one SUBNET".into());
    }
    let v6: Vec<IpNet> = ipv6
        .subnets
        .iter()
        .map(|s| parse_subnet(s))
        .collect::<Result<_, _>>()
        .map_err(bad)?;
    if let Some(s) = v6.iter().find(|s| !matches!(s, IpNet::V6(_))) {
        return Err(format!("--ipv6 {s}: not an IPv6 subnet"));
    }
    let mut all: Vec<IpNet> = subnets
        .iter()
        .map(|s| parse_subnet(s))
        .collect::<Result<_, _>>()
        .map_err(bad)?;
    all.extend(v6);
    let spec = PoolSpec {
        name: name.to_string(),
        subnets: all,
        block_size: bs,
        ipv6_block_size: ipv6.block_size,
    };
    model::validate_spec(&spec).map_err(bad)?;
    Ok(StoreCmd::CreatePool(spec))
}

pub fn parse_pool_name(name: &str) -> Result<String, String> {
    model::validate_pool_name(name).map_err(bad)?;
    Ok(name.to_string())
}

pub fn parse_node_name(name: &str) -> Result<String, String> {
    model::validate_node_name(name).map_err(bad)?;
    Ok(name.to_string())
}

pub fn parse_address(s: &str) -> Result<IpAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("malformed address {s:?}: expected an IPv4 or IPv6 address"))
}

pub fn parse_block(s: &str) -> Result<IpNet, String> {
    parse_subnet(s).map_err(bad)
}

/// Parses a subnet to add to a pool: a CIDR outside the reserved ranges
/// (as `pool create` checks through the pool spec).
pub fn parse_new_subnet(s: &str) -> Result<IpNet, String> {
    let net = parse_subnet(s).map_err(bad)?;
    model::check_not_reserved(&net).map_err(bad)?;
    Ok(net)
}

/// Runs a parsed store command; returns the exit code.
pub fn run(args: &StoreArgs, json: bool, cmd: StoreCmd) -> i32 {
    let cfg = match args.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("coilctl: {e}");
            return exit::USAGE;
        }
    };
    let rt = match crate::runtime("coilctl", false) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let res = rt.block_on(dispatch(&cfg, json, cmd));
    match res {
        Ok(code) => code,
        Err(Failure::Store(e)) => {
            eprintln!("coilctl: {e}");
            e.exit_code()
        }
        Err(Failure::Other(msg, code)) => {
            eprintln!("coilctl: {msg}");
            code
        }
    }
}

enum Failure {
    Store(StoreError),
    Other(String, i32),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

async fn dispatch(cfg: &StoreConfig, json: bool, cmd: StoreCmd) -> Result<i32, Failure> {
    // The embedded store's journal, when this process opened it (closed
    // cleanly at the end).
    let mut own_journal: Option<Arc<Journal>> = None;
    let backend = match cfg.kind {
        StoreKind::Etcd => AnyBackend::Etcd(Box::new(
            EtcdBackend::connect(&cfg.etcd)
                .await
                .map_err(StoreError::from)?,
        )),
        StoreKind::Embedded => match Journal::open(&cfg.journal_dir) {
            Ok(j) => {
                let j = Arc::new(j);
                own_journal = Some(j.clone());
                AnyBackend::Embedded(Arc::new(
                    EmbeddedBackend::open(j).map_err(StoreError::from)?,
                ))
            }
            // coild owns the store: go through its socket.
            Err(JournalError::Locked { .. }) => AnyBackend::Remote(RemoteBackend::new(
                cfg.socket.clone(),
                cfg.etcd.timeout.max(Duration::from_secs(5)),
            )),
            Err(e) => {
                return Err(Failure::Other(
                    format!("opening the embedded store: {e}"),
                    if e.is_corruption() {
                        exit::PROBLEMS
                    } else {
                        exit::UNAVAILABLE
                    },
                ))
            }
        },
    };
    let remote = matches!(backend, AnyBackend::Remote(_));
    let s = Store::open(backend, &cfg.prefix).await.map_err(|e| {
        if remote && e.is_unavailable() {
            Failure::Other(
                format!(
                    "the journal {} is locked (coild runs) but coild's socket does not answer: {e}",
                    cfg.journal_dir.display()
                ),
                exit::UNAVAILABLE,
            )
        } else {
            Failure::Store(e)
        }
    })?;
    let r = exec(&s, json, cmd).await;
    drop(s);
    if let Some(j) = own_journal {
        if let Ok(j) = Arc::try_unwrap(j) {
            if let Err(e) = j.close() {
                eprintln!("coilctl: closing the journal: {e}");
            }
        }
    }
    r
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

fn unix(t: u64) -> String {
    if t == 0 {
        return "-".into();
    }
    // RFC 3339 in UTC without pulling in a date crate.
    let days = t / 86_400;
    let secs = t % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Prints the bad entries a command met (and skipped) on stderr, after its
/// output, so stdout stays what the command always prints.
fn warn_bad(bad: &[BadEntry], note: &str) {
    if bad.is_empty() {
        return;
    }
    eprintln!();
    eprintln!(
        "bad store entries ({}), skipped{note}; `coilctl store check` lists every one:",
        bad.len()
    );
    for b in bad {
        eprintln!("  {}: {}", b.key, b.reason);
    }
}

fn bad_json(bad: &[BadEntry]) -> Value {
    Value::Array(
        bad.iter()
            .map(|b| json!({"key": b.key, "reason": b.reason}))
            .collect(),
    )
}

/// "ipv4", "ipv6", or "ipv4+ipv6" for a dual-stack pool.
fn families_label(p: &Pool) -> String {
    p.families()
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("+")
}

/// The block size, "4/8" (IPv4/IPv6) for a dual-stack pool.
fn block_size_label(p: &Pool) -> String {
    p.families()
        .iter()
        .filter_map(|f| p.block_size_of(*f))
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// A pool's shape in JSON: the first family's fields as before dual-stack,
/// and `families` and `ipv6` (a dual-stack pool's IPv6 part).
fn pool_json(p: &Pool) -> Value {
    let mut v = json!({
        "pool": p.name,
        "family": p.family,
        "families": p.families(),
        "block_size": p.block_size,
        "subnets": p.subnets,
        "blocks": p.total_blocks(),
    });
    if let Some(part) = &p.ipv6 {
        v["ipv6"] = json!({
            "block_size": part.block_size,
            "subnets": part.subnets,
            "blocks": p.family_range(Family::Ipv6).count(),
        });
    }
    v
}

fn lease_json(l: &BlockLease) -> Value {
    json!({
        "pool": l.pool,
        "block": l.block.to_string(),
        "node": l.node,
        "epoch": l.epoch,
        "acquired_unix": l.acquired_unix,
    })
}

async fn exec<B: Backend>(s: &Store<B>, json: bool, cmd: StoreCmd) -> Result<i32, Failure> {
    match cmd {
        StoreCmd::CreatePool(spec) => {
            let p = s.create_pool(&spec).await?;
            if json {
                print_json(&pool_json(&p));
            } else {
                let parts: Vec<String> = p
                    .families()
                    .iter()
                    .map(|f| {
                        let n = p.family_range(*f).count();
                        let bs = p.block_size_of(*f).unwrap_or(0);
                        format!("{n} {f} blocks of {} addresses", 1u128 << bs)
                    })
                    .collect();
                println!("created pool {} ({})", p.name, parts.join(", "));
            }
        }
        StoreCmd::AddSubnet(name, subnet, block_size) => {
            let p = s.add_subnet_with(&name, subnet, block_size).await?;
            if json {
                print_json(&pool_json(&p));
            } else {
                println!(
                    "added {subnet} to pool {} ({}, now {} blocks)",
                    p.name,
                    families_label(&p),
                    p.total_blocks()
                );
            }
        }
        StoreCmd::RemovePool(name, force) => {
            let r = s.remove_pool(&name, force).await?;
            if json {
                print_json(&json!({"pool": r.pool, "blocks_released": r.blocks_released}));
            } else if r.blocks_released > 0 {
                println!(
                    "removed pool {} and released {} empty block(s)",
                    r.pool, r.blocks_released
                );
            } else {
                println!("removed pool {}", r.pool);
            }
        }
        StoreCmd::ShowPool(name) => {
            let u = s.pool_usage(&name).await?;
            let p = &u.pool;
            let mut by_node: BTreeMap<&str, usize> = BTreeMap::new();
            for l in &u.leases {
                *by_node.entry(l.node.as_str()).or_default() += 1;
            }
            // A bad entry at one of the pool's block keys occupies that
            // block: it is neither leased (as far as coil can tell) nor free.
            let occupied: Vec<IpNet> = u
                .bad
                .iter()
                .filter_map(|b| s.keys().block_of_key(p, &b.key))
                .collect();
            // (subnet, blocks, leased, occupied by bad entries)
            let per_subnet: Vec<(IpNet, u64, usize, usize)> = p
                .all_subnets()
                .map(|sn| {
                    let leased = u.leases.iter().filter(|l| sn.contains(&l.block)).count();
                    let bad = occupied.iter().filter(|b| sn.contains(*b)).count();
                    (*sn, p.blocks_in(sn), leased, bad)
                })
                .collect();
            let total = p.total_blocks();
            let free = |n: u64, leased: usize, bad: usize| n.saturating_sub((leased + bad) as u64);
            if json {
                let mut v = pool_json(p);
                let more = json!({
                    "addresses_per_block": p.addresses_per_block().to_string(),
                    "blocks": total,
                    "leased": u.leases.len(),
                    "occupied_by_bad_entries": occupied.len(),
                    "free": free(total, u.leases.len(), occupied.len()),
                    "subnets": per_subnet.iter().map(|(sn, n, l, b)| json!({
                        "subnet": sn.to_string(), "blocks": n, "leased": l,
                        "occupied_by_bad_entries": b, "free": free(*n, *l, *b),
                    })).collect::<Vec<_>>(),
                    "nodes": by_node,
                    "leases": u.leases.iter().map(lease_json).collect::<Vec<_>>(),
                    "bad_entries": bad_json(&u.bad),
                });
                if let (Some(o), Value::Object(m)) = (v.as_object_mut(), more) {
                    o.extend(m);
                }
                print_json(&v);
                warn_bad(&u.bad, "");
                return Ok(exit::OK);
            }
            println!("pool:        {}", p.name);
            if p.is_dual() {
                println!("family:      {} (dual-stack)", families_label(p));
            } else {
                println!("family:      {}", p.family);
            }
            for (i, f) in p.families().into_iter().enumerate() {
                let (Some(bs), Some(prefix)) = (p.block_size_of(f), p.block_prefix_of(f)) else {
                    continue;
                };
                let label = if i == 0 { "block size:" } else { "" };
                let family = if p.is_dual() {
                    format!("{f} ")
                } else {
                    String::new()
                };
                println!(
                    "{label:<12} {family}{bs} ({} addresses, /{prefix})",
                    1u128 << bs
                );
            }
            if occupied.is_empty() {
                println!(
                    "blocks:      {} leased, {} free, {} total",
                    u.leases.len(),
                    free(total, u.leases.len(), 0),
                    total
                );
            } else {
                println!(
                    "blocks:      {} leased, {} occupied by bad entries, {} free, {} total",
                    u.leases.len(),
                    occupied.len(),
                    free(total, u.leases.len(), occupied.len()),
                    total
                );
            }
            println!("created:     {}", unix(p.created_unix));
            println!();
            let mut t = if occupied.is_empty() {
                Table::new(&["SUBNET", "BLOCKS", "LEASED", "FREE"])
            } else {
                Table::new(&["SUBNET", "BLOCKS", "LEASED", "BAD", "FREE"])
            };
            for (sn, n, l, b) in &per_subnet {
                let mut row = vec![sn.to_string(), n.to_string(), l.to_string()];
                if !occupied.is_empty() {
                    row.push(b.to_string());
                }
                row.push(free(*n, *l, *b).to_string());
                t.row(row);
            }
            print!("{}", t.render());
            if !by_node.is_empty() {
                println!();
                let mut t = Table::new(&["NODE", "BLOCKS"]);
                for (n, c) in &by_node {
                    t.row(vec![n.to_string(), c.to_string()]);
                }
                print!("{}", t.render());
                println!();
                let mut t = Table::new(&["BLOCK", "NODE", "EPOCH", "ACQUIRED"]);
                for l in &u.leases {
                    t.row(vec![
                        l.block.to_string(),
                        l.node.clone(),
                        l.epoch.to_string(),
                        unix(l.acquired_unix),
                    ]);
                }
                print!("{}", t.render());
            }
            warn_bad(&u.bad, "");
        }
        StoreCmd::ListPools => {
            let listed = s.list_pools_checked().await?;
            let pools = listed.items;
            let blocks = s.all_blocks_checked().await?;
            let mut bad = listed.bad;
            bad.extend(blocks.bad);
            let blocks = blocks.items;
            let leased = |name: &str| blocks.iter().filter(|l| l.pool == name).count();
            if json {
                print_json(&Value::Array(
                    pools
                        .iter()
                        .map(|p| {
                            let mut v = pool_json(p);
                            v["leased"] = json!(leased(&p.name));
                            v
                        })
                        .collect(),
                ));
                warn_bad(&bad, "");
                return Ok(exit::OK);
            }
            let mut t = Table::new(&[
                "NAME",
                "FAMILY",
                "BLOCK-SIZE",
                "BLOCKS",
                "LEASED",
                "SUBNETS",
            ]);
            for p in &pools {
                t.row(vec![
                    p.name.clone(),
                    families_label(p),
                    block_size_label(p),
                    p.total_blocks().to_string(),
                    leased(&p.name).to_string(),
                    p.all_subnets()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                ]);
            }
            print!("{}", t.render());
            warn_bad(&bad, "");
        }
        StoreCmd::ListNodes => {
            let listed = s.nodes_checked().await?;
            let nodes = listed.items;
            if json {
                print_json(&serde_json::to_value(&nodes).unwrap_or(Value::Null));
                warn_bad(&listed.bad, "");
                return Ok(exit::OK);
            }
            let mut t = Table::new(&["NODE", "STATUS", "BLOCKS", "BOOT-ID", "STARTED"]);
            for n in &nodes {
                let status = match (&n.removed, n.alive, n.unreachable_since) {
                    (Some(r), true, _) => {
                        format!("removed {} (alive again!)", unix(r.removed_unix))
                    }
                    (Some(r), false, _) => format!("removed {}", unix(r.removed_unix)),
                    (None, true, _) => "alive".into(),
                    (None, false, Some(since)) => format!("unreachable since {}", unix(since)),
                    (None, false, None) if n.blocks > 0 => "unreachable".into(),
                    (None, false, None) => "gone".into(),
                };
                t.row(vec![
                    n.node.clone(),
                    status,
                    n.blocks.to_string(),
                    n.boot_id.clone().unwrap_or_else(|| "-".into()),
                    n.started_unix.map_or("-".into(), unix),
                ]);
            }
            print!("{}", t.render());
            warn_bad(&listed.bad, "");
        }
        StoreCmd::NodeBlocks(node) => {
            let listed = s.node_blocks_checked(&node).await?;
            let blocks = listed.items;
            // A bad block entry's owner cannot be told: it may be this
            // node's.
            let note = " (whose owner cannot be told: any may be this node's)";
            if json {
                print_json(&Value::Array(blocks.iter().map(lease_json).collect()));
                warn_bad(&listed.bad, note);
                return Ok(exit::OK);
            }
            let mut t = Table::new(&["POOL", "BLOCK", "EPOCH", "ACQUIRED"]);
            for l in &blocks {
                t.row(vec![
                    l.pool.clone(),
                    l.block.to_string(),
                    l.epoch.to_string(),
                    unix(l.acquired_unix),
                ]);
            }
            print!("{}", t.render());
            warn_bad(&listed.bad, note);
        }
        StoreCmd::AddressInfo(addr) => {
            let i = s.address_info(addr).await?;
            if json {
                print_json(&json!({
                    "address": addr.to_string(),
                    "pool": i.pool,
                    "block": i.block.map(|b| b.to_string()),
                    "lease": i.lease.as_ref().map(lease_json),
                    "assignment": i.record,
                }));
            } else {
                let dash = || "-".to_string();
                println!("address:     {addr}");
                println!("pool:        {}", i.pool.clone().unwrap_or_else(dash));
                println!(
                    "block:       {}",
                    i.block.map(|b| b.to_string()).unwrap_or_else(dash)
                );
                match &i.lease {
                    Some(l) => println!("leased by:   {} (epoch {})", l.node, l.epoch),
                    None => println!("leased by:   - (block not leased)"),
                }
                match &i.record {
                    Some(r) => {
                        println!("container:   {} ({})", r.container_id, r.ifname);
                        if !r.pod_name.is_empty() {
                            println!("pod:         {}/{}", r.pod_namespace, r.pod_name);
                        }
                        println!("node:        {}", r.node);
                    }
                    None => println!("assigned:    no (per the address index)"),
                }
            }
            if i.pool.is_none() {
                eprintln!("coilctl: address {addr} is not in any pool");
                return Ok(exit::PROBLEMS);
            }
        }
        StoreCmd::ReleaseBlock { node, block, force } => {
            let l = s.admin_release(&node, block, force).await?;
            if json {
                print_json(&json!({"released": lease_json(&l)}));
            } else {
                println!(
                    "released block {} of pool {} from {} (epoch {})",
                    l.block, l.pool, l.node, l.epoch
                );
            }
        }
        StoreCmd::RemoveNode(node, force) => {
            if force {
                eprintln!(
                    "coilctl: WARNING: removing {node} although its liveness key exists: if its \
                     pods still run, their addresses may be handed to other pods"
                );
            }
            let r = s
                .remove_node(&node, "coilctl node remove", force, None)
                .await?;
            if json {
                print_json(&serde_json::to_value(&r).unwrap_or(Value::Null));
            } else {
                println!(
                    "removed node {node}: {} block(s) freed ({}); it leases nothing until \
                     `coilctl node readmit {node}`",
                    r.blocks.len(),
                    r.blocks
                        .iter()
                        .map(|b| b.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        StoreCmd::ReadmitNode(node) => {
            let lifted = s.readmit_node(&node).await?;
            if json {
                print_json(&json!({"node": node, "readmitted": lifted}));
            } else if lifted {
                println!("re-admitted node {node}: it may lease blocks again");
            } else {
                println!("node {node} was not removed; nothing to do");
            }
        }
        StoreCmd::Check => {
            let bad = s.check().await?;
            if json {
                print_json(&json!({"ok": bad.is_empty(), "bad_entries": bad_json(&bad)}));
            } else if bad.is_empty() {
                println!("ok: every entry under {} is valid", s.keys().prefix());
            } else {
                let mut t = Table::new(&["KEY", "REASON"]);
                for b in &bad {
                    t.row(vec![b.key.clone(), b.reason.clone()]);
                }
                print!("{}", t.render());
                println!(
                    "FAILED: {} bad entr{}; coil skips them and never overwrites or deletes them: \
                     find what wrote them, then fix or remove each with etcdctl",
                    bad.len(),
                    if bad.len() == 1 { "y" } else { "ies" }
                );
            }
            if !bad.is_empty() {
                return Ok(exit::PROBLEMS);
            }
        }
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn create_forms() {
        let none = Ipv6Args::default();
        match parse_create("default", &v(&["10.0.0.0/16", "5"]), None, &none) {
            Ok(StoreCmd::CreatePool(s)) => {
                assert_eq!(s.block_size, 5);
                assert_eq!(s.subnets.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        match parse_create(
            "default",
            &v(&["10.0.0.0/16", "10.1.0.0/16"]),
            Some(4),
            &none,
        ) {
            Ok(StoreCmd::CreatePool(s)) => assert_eq!(s.subnets.len(), 2),
            other => panic!("{other:?}"),
        }
        assert!(parse_create("default", &v(&["10.0.0.0/16"]), None, &none).is_err());
        assert!(parse_create("default", &v(&["10.0.0.0/16", "x"]), None, &none).is_err());
        assert!(parse_create("Bad", &v(&["10.0.0.0/16"]), Some(5), &none).is_err());
        assert!(parse_create("ok", &v(&[]), Some(5), &none).is_err());
        let dual = Ipv6Args {
            subnets: v(&["fd00:10::/112"]),
            block_size: Some(8),
        };
        match parse_create("default", &v(&["10.0.0.0/16"]), Some(5), &dual) {
            Ok(StoreCmd::CreatePool(s)) => {
                assert_eq!(s.subnets.len(), 2);
                assert_eq!(s.ipv6_block_size, Some(8));
            }
            other => panic!("{other:?}"),
        }
        let wrong = Ipv6Args {
            subnets: v(&["10.1.0.0/16"]),
            block_size: None,
        };
        let e = parse_create("default", &v(&["10.0.0.0/16"]), Some(5), &wrong).expect_err("v4");
        assert!(e.contains("not an IPv6 subnet"), "{e}");
        let lone = Ipv6Args {
            subnets: vec![],
            block_size: Some(8),
        };
        assert!(parse_create("default", &v(&["10.0.0.0/16"]), Some(5), &lone).is_err());
    }

    #[test]
    fn dates() {
        assert_eq!(unix(0), "-");
        assert_eq!(unix(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
