//! `coil-installer`: puts the plugin and its network configuration in
//! place on a node, atomically, and enables forwarding.
//!
//! Runs as the init container of the coil-node DaemonSet (or once on a
//! host without Kubernetes). Environment, as in coil v1 where it makes
//! sense:
//! - `CNI_BIN_DIR` (default `/host/opt/cni/bin`): where `coil` goes;
//! - `CNI_ETC_DIR` (default `/host/etc/cni/net.d`): where the conflist goes;
//! - `CNI_CONF_NAME` (default `10-coil.conflist`): a plain file name (no
//!   '/', not "." or ".."), else nothing is installed;
//! - `CNI_NETCONF_FILE` (default `/etc/coil/net.json`) or `CNI_NETCONF`
//!   (inline JSON, wins over the file): the conflist to install;
//! - `COIL_PATH` (default: the directory of this program): where to find
//!   the `coil` binary to copy (`coil`, else `hypercoil`);
//! - `COIL_ENABLE_IPV6_FORWARDING=1` also turns on IPv6 forwarding;
//! - `COIL_NODE_NAME` and `COIL_BOOT_TAINT` (comma-separated taint keys):
//!   remove the node's boot taints once the plugin is in place, through
//!   the Kubernetes API (the pod's service account, or the kubeconfig in
//!   `COIL_KUBECONFIG`, else `KUBECONFIG`).
//!
//! Every file is written to a temporary file in the target directory,
//! fsynced, renamed over the final name and the directory fsynced, so a
//! runtime never sees a half-written plugin or configuration. The
//! temporary file has a random name and is created with O_CREAT|O_EXCL, so
//! nothing planted in the directory (a symlink at a guessed name) is ever
//! followed or overwritten.

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
                    the plugin is in place; needs COIL_NODE_NAME
  COIL_KUBECONFIG   kubeconfig for that [default: KUBECONFIG, ~/.kube/config,
                    else the in-cluster service account]";

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

/// Checks a file name taken from the environment: one path component that
/// names a file in its directory.
pub fn validate_file_name(var: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(format!(
            "{var} {name:?} is not a file name: it must be one path component \
             (no '/', not empty, \".\" or \"..\")"
        ));
    }
    Ok(())
}

/// Writes `data` to `dir/name` atomically with `mode`: a new temporary file
/// with a random name (created with O_CREAT|O_EXCL, so a symlink or file
/// already at that name is never followed or reused), written, given
/// `mode`, fsynced, renamed over `dir/name`, and the directory fsynced.
/// On failure the temporary file is removed and `dir/name` is untouched.
pub fn install_file(dir: &Path, name: &str, data: &[u8], mode: u32) -> std::io::Result<PathBuf> {
    if validate_file_name("file name", name).is_err() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name:?} is not a file name"),
        ));
    }
    std::fs::create_dir_all(dir)?;
    let target = dir.join(name);
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".coil-tmp")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    tmp.write_all(data)?;
    // Explicitly, so the umask does not decide.
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    // rename(2) replaces `target` itself, even when it is a symlink.
    tmp.persist(&target).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(target)
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
    // Set but empty is refused like any other bad name, not defaulted.
    let conf_name = match std::env::var_os("CNI_CONF_NAME") {
        None => "10-coil.conflist".to_string(),
        Some(v) => v
            .into_string()
            .map_err(|v| (format!("CNI_CONF_NAME {v:?} is not UTF-8"), exit::USAGE))?,
    };
    validate_file_name("CNI_CONF_NAME", &conf_name).map_err(|e| (e, exit::USAGE))?;
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
    if !conf_name.ends_with(".conflist") {
        msgs.push(format!(
            "warning: CNI_CONF_NAME {conf_name:?} does not end in .conflist; \
             runtimes read a file of any other name as a single netconf, not a list"
        ));
    }
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
        if node.is_empty() {
            return Err(("COIL_BOOT_TAINT needs COIL_NODE_NAME".into(), exit::USAGE));
        }
        let kubeconfig = std::env::var_os("COIL_KUBECONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| (format!("runtime: {e}"), exit::PROBLEMS))?;
        let changed = rt.block_on(async {
            let client = crate::kube::client(kubeconfig.as_deref())
                .await
                .map_err(|e| (e, exit::USAGE))?;
            crate::kube::remove_taints(&client, &node, &taints)
                .await
                .map_err(|e| (e, exit::UNAVAILABLE))
        })?;
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

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("metadata").permissions().mode() & 0o7777
    }

    #[test]
    fn a_symlink_planted_at_a_temp_name_or_the_target_is_not_followed() {
        let d = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"victim").expect("victim");
        // The name the installer used to pick (pid-derived, predictable).
        let planted = d
            .path()
            .join(format!(".x.conflist.coil-tmp-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).expect("symlink");
        let p = install_file(d.path(), "x.conflist", b"new", 0o644).expect("install");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"victim");
        assert!(std::fs::symlink_metadata(&planted)
            .expect("planted")
            .file_type()
            .is_symlink());
        assert!(std::fs::symlink_metadata(&p).expect("target").is_file());
        assert_eq!(std::fs::read(&p).expect("target"), b"new");
        assert_eq!(mode(&p), 0o644);
        // A symlink at the target itself is replaced, not written through.
        let bin = d.path().join("coil");
        std::os::unix::fs::symlink(&victim, &bin).expect("symlink");
        install_file(d.path(), "coil", b"\x7fELF", 0o755).expect("install");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"victim");
        assert!(std::fs::symlink_metadata(&bin).expect("bin").is_file());
        assert_eq!(mode(&bin), 0o755);
        // Only the planted link and the two installed files are left.
        assert_eq!(std::fs::read_dir(d.path()).expect("dir").count(), 3);
    }

    #[test]
    fn file_names_from_the_environment_are_one_component() {
        for bad in ["", ".", "..", "../x.conflist", "a/b", "/etc/passwd", "x\0y"] {
            let e = validate_file_name("CNI_CONF_NAME", bad).expect_err(bad);
            assert!(
                e.contains("CNI_CONF_NAME") && e.contains("not a file name"),
                "{e}"
            );
        }
        for good in ["10-coil.conflist", ".hidden", "a..b", "...", "coil"] {
            assert!(validate_file_name("CNI_CONF_NAME", good).is_ok(), "{good}");
        }
        let d = tempfile::tempdir().expect("tempdir");
        let sub = d.path().join("sub");
        assert!(install_file(&sub, "../escape", b"x", 0o644).is_err());
        assert!(!d.path().join("escape").exists());
        assert!(!sub.exists(), "nothing created for a refused name");
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
