//! `coil-installer`: puts the plugin and its network configuration in
//! place on a node, atomically, and enables forwarding.
//!
//! Runs as the init container of the coil-node DaemonSet (or once on a
//! host without Kubernetes). Environment, as in coil v1 where it makes
//! sense:
//! - `CNI_BIN_DIR` (default `/host/opt/cni/bin`): where `coil` goes;
//! - `CNI_ETC_DIR` (default `/host/etc/cni/net.d`): where the conflist goes;
//! - `CNI_CONF_NAME` (default `10-coil.conflist`);
//! - `CNI_NETCONF_FILE` (default `/etc/coil/net.json`) or `CNI_NETCONF`
//!   (inline JSON, wins over the file): the conflist to install;
//! - `COIL_PATH` (default: the directory of this program): where to find
//!   the `coil` binary to copy (`coil`, else `hypercoil`);
//! - `COIL_ENABLE_IPV6_FORWARDING=1` also turns on IPv6 forwarding;
//! - `COIL_NODE_NAME`, `COIL_BOOT_TAINT` (comma-separated taint keys) and
//!   `COIL_KUBE_API` (plain HTTP, e.g. a `kubectl proxy` sidecar): remove
//!   the node's boot taints once the plugin is in place.
//!
//! Every file is written to a temporary name in the target directory,
//! fsynced, renamed over the final name and the directory fsynced, so a
//! runtime never sees a half-written plugin or configuration.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use clap::Parser;
use coil::exit;

const ENVIRONMENT: &str = "\
Environment:
  CNI_BIN_DIR       where the plugin goes [default: /host/opt/cni/bin]
  CNI_ETC_DIR       where the conflist goes [default: /host/etc/cni/net.d]
  CNI_CONF_NAME     the conflist's file name [default: 10-coil.conflist]
  CNI_NETCONF       the conflist itself (JSON); wins over CNI_NETCONF_FILE
  CNI_NETCONF_FILE  a file holding the conflist [default: /etc/coil/net.json]
  COIL_PATH         where to find coil (or hypercoil) to copy
                    [default: this program's directory]
  COIL_ENABLE_IPV6_FORWARDING=1   also turn on IPv6 forwarding
  COIL_BOOT_TAINT   comma-separated taint keys to remove from the node once
                    the plugin is in place; needs COIL_NODE_NAME and
                    COIL_KUBE_API (plain HTTP, e.g. a kubectl proxy sidecar)";

#[derive(Parser, Debug)]
#[command(
    name = "coil-installer",
    version,
    about = "Puts coil's CNI plugin and conflist in place on this node, atomically, \
             and enables forwarding",
    long_about = "Puts coil's CNI plugin and conflist in place on this node, atomically, \
                  and enables forwarding. It runs as the init container of the coil-node \
                  DaemonSet, or once on a host without Kubernetes. It takes no arguments: \
                  everything comes from the environment.",
    after_help = ENVIRONMENT
)]
struct Args {}

fn env_or(k: &str, d: &str) -> String {
    std::env::var(k)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| d.to_string())
}

/// Writes `data` to `dir/name` atomically with `mode`.
pub fn install_file(dir: &Path, name: &str, data: &[u8], mode: u32) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.coil-tmp-{}", std::process::id()));
    let target = dir.join(name);
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &target)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map(|_| target)
}

/// Checks that `conf` is a conflist whose plugins include coil.
pub fn validate_conflist(conf: &[u8]) -> Result<(), String> {
    let v: serde_json::Value =
        serde_json::from_slice(conf).map_err(|e| format!("the netconf is not JSON: {e}"))?;
    let version = v["cniVersion"].as_str().unwrap_or("");
    if !coil::cni::SUPPORTED_VERSIONS.contains(&version) {
        return Err(format!(
            "the netconf's cniVersion {version:?} is not supported"
        ));
    }
    if v["name"].as_str().unwrap_or("").is_empty() {
        return Err("the netconf has no name".into());
    }
    let plugins = v["plugins"]
        .as_array()
        .ok_or("the netconf is not a conflist (no plugins array)")?;
    if !plugins.iter().any(|p| p["type"] == "coil") {
        return Err("the conflist has no plugin of type coil".into());
    }
    Ok(())
}

fn sysctl(path: &str) -> Result<(), String> {
    std::fs::write(path, b"1").map_err(|e| format!("writing 1 to {path}: {e}"))
}

/// Runs the installer; returns the exit code.
pub fn main(args: Vec<OsString>) -> i32 {
    let Args {} = match crate::parse_args(args) {
        Ok(a) => a,
        Err(code) => return code,
    };
    match run() {
        Ok(msgs) => {
            for m in msgs {
                eprintln!("coil-installer: {m}");
            }
            exit::OK
        }
        Err((e, code)) => {
            eprintln!("coil-installer: {e}");
            code
        }
    }
}

fn run() -> Result<Vec<String>, (String, i32)> {
    let bin_dir = PathBuf::from(env_or("CNI_BIN_DIR", "/host/opt/cni/bin"));
    let etc_dir = PathBuf::from(env_or("CNI_ETC_DIR", "/host/etc/cni/net.d"));
    let conf_name = env_or("CNI_CONF_NAME", "10-coil.conflist");
    let conf = match std::env::var("CNI_NETCONF").ok().filter(|v| !v.is_empty()) {
        Some(c) => c.into_bytes(),
        None => {
            let f = env_or("CNI_NETCONF_FILE", "/etc/coil/net.json");
            std::fs::read(&f).map_err(|e| (format!("reading the netconf {f}: {e}"), exit::USAGE))?
        }
    };
    validate_conflist(&conf).map_err(|e| (e, exit::USAGE))?;
    let coil_dir = match std::env::var("COIL_PATH").ok().filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("/usr/local/bin")),
    };
    let src = ["coil", "hypercoil"]
        .iter()
        .map(|n| coil_dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            (
                format!("no coil or hypercoil binary in {}", coil_dir.display()),
                exit::USAGE,
            )
        })?;
    let bin = std::fs::read(&src)
        .map_err(|e| (format!("reading {}: {e}", src.display()), exit::PROBLEMS))?;
    let mut msgs = Vec::new();
    let p = install_file(&bin_dir, "coil", &bin, 0o755).map_err(|e| {
        (
            format!("installing the plugin in {}: {e}", bin_dir.display()),
            exit::PROBLEMS,
        )
    })?;
    msgs.push(format!("installed {}", p.display()));
    let p = install_file(&etc_dir, &conf_name, &conf, 0o644).map_err(|e| {
        (
            format!("installing the conflist in {}: {e}", etc_dir.display()),
            exit::PROBLEMS,
        )
    })?;
    msgs.push(format!("installed {}", p.display()));
    sysctl("/proc/sys/net/ipv4/ip_forward").map_err(|e| (e, exit::PROBLEMS))?;
    msgs.push("enabled IPv4 forwarding".into());
    if std::env::var("COIL_ENABLE_IPV6_FORWARDING").as_deref() == Ok("1") {
        sysctl("/proc/sys/net/ipv6/conf/all/forwarding").map_err(|e| (e, exit::PROBLEMS))?;
        msgs.push("enabled IPv6 forwarding".into());
    }
    let taints: Vec<String> = env_or("COIL_BOOT_TAINT", "")
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if !taints.is_empty() {
        let node = env_or("COIL_NODE_NAME", "");
        let api = env_or("COIL_KUBE_API", "");
        if node.is_empty() || api.is_empty() {
            return Err((
                "COIL_BOOT_TAINT needs COIL_NODE_NAME and COIL_KUBE_API".into(),
                exit::USAGE,
            ));
        }
        let k = crate::kube::KubeApi::new(&api).map_err(|e| (e, exit::USAGE))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| (format!("runtime: {e}"), exit::PROBLEMS))?;
        let changed = rt
            .block_on(k.remove_taints(&node, &taints))
            .map_err(|e| (e, exit::UNAVAILABLE))?;
        msgs.push(if changed {
            format!(
                "removed boot taint(s) {} from node {node}",
                taints.join(",")
            )
        } else {
            format!("node {node} had no boot taint")
        });
    }
    Ok(msgs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_is_atomic_and_replaces() {
        let d = tempfile::tempdir().expect("tempdir");
        install_file(d.path(), "x.conflist", b"one", 0o644).expect("install");
        install_file(d.path(), "x.conflist", b"two", 0o644).expect("replace");
        assert_eq!(
            std::fs::read(d.path().join("x.conflist")).expect("read"),
            b"two"
        );
        let left: Vec<_> = std::fs::read_dir(d.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 1, "no temporary file left: {left:?}");
    }

    #[test]
    fn conflists_are_checked() {
        assert!(validate_conflist(
            br#"{"cniVersion":"1.0.0","name":"k","plugins":[{"type":"coil"}]}"#
        )
        .is_ok());
        assert!(validate_conflist(
            br#"{"cniVersion":"1.0.0","name":"k","plugins":[{"type":"ptp"}]}"#
        )
        .is_err());
        assert!(
            validate_conflist(br#"{"cniVersion":"9","name":"k","plugins":[{"type":"coil"}]}"#)
                .is_err()
        );
        assert!(validate_conflist(br#"{"cniVersion":"1.0.0","name":"k","type":"coil"}"#).is_err());
        assert!(validate_conflist(b"nope").is_err());
    }
}
