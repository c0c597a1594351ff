//! coilctl's store configuration: flags, then `COILCTL_*` environment
//! (clap reads both), then a YAML config file (`--config`, else
//! `~/.coilctl.yml` when it exists), then defaults — the same precedence
//! and the same file keys as coil v1.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use coil_adapters::etcd::{EtcdOptions, TlsPem};
use serde::Deserialize;

/// Default etcd key prefix.
pub const DEFAULT_PREFIX: &str = "/coil/";
/// Default per-request etcd deadline.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Which store coilctl talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// A (shared) etcd cluster.
    Etcd,
    /// The embedded store in a node's journal (single-node mode; coild must
    /// be stopped).
    Embedded,
}

/// Store flags shared by every store command.
#[derive(Args, Debug, Clone, Default)]
pub struct StoreArgs {
    /// YAML config file [default: ~/.coilctl.yml if it exists].
    #[arg(long, global = true, env = "COILCTL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Store backend [default: etcd].
    #[arg(long, global = true, env = "COILCTL_STORE", value_enum)]
    pub store: Option<StoreKind>,
    /// Comma-separated etcd endpoints [default: http://127.0.0.1:2379].
    #[arg(long, global = true, env = "COILCTL_ENDPOINTS", value_name = "URLS")]
    pub etcd_endpoints: Option<String>,
    /// Key prefix in etcd [default: /coil/].
    #[arg(long, global = true, env = "COILCTL_PREFIX", value_name = "PREFIX")]
    pub etcd_prefix: Option<String>,
    /// Deadline of each etcd request, like 2s or 500ms [default: 2s].
    #[arg(long, global = true, env = "COILCTL_TIMEOUT", value_name = "DURATION")]
    pub etcd_timeout: Option<String>,
    #[arg(long, global = true, env = "COILCTL_USERNAME")]
    pub etcd_username: Option<String>,
    #[arg(long, global = true, env = "COILCTL_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
    /// CA certificate (PEM file) to verify etcd.
    #[arg(long, global = true, env = "COILCTL_TLS_CA_FILE", value_name = "FILE")]
    pub etcd_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM file).
    #[arg(
        long,
        global = true,
        env = "COILCTL_TLS_CERT_FILE",
        value_name = "FILE"
    )]
    pub etcd_tls_cert: Option<PathBuf>,
    /// Client key (PEM file).
    #[arg(long, global = true, env = "COILCTL_TLS_KEY_FILE", value_name = "FILE")]
    pub etcd_tls_key: Option<PathBuf>,
    /// Journal directory of the embedded store [default: /var/lib/coil/journal].
    #[arg(long, global = true, env = "COILCTL_JOURNAL_DIR", value_name = "DIR")]
    pub journal_dir: Option<PathBuf>,
    /// coild's socket, used for the embedded store while coild runs
    /// [default: /run/coild.sock].
    #[arg(long, global = true, env = "COILCTL_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// The config file (v1's keys, plus `store` and `journal-dir`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    store: Option<StoreKind>,
    endpoints: Option<Endpoints>,
    prefix: Option<String>,
    timeout: Option<String>,
    username: Option<String>,
    password: Option<String>,
    tls_ca_file: Option<PathBuf>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    /// Inline PEM (as v1's mtest wrote them).
    tls_ca: Option<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    journal_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Endpoints {
    List(Vec<String>),
    One(String),
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub kind: StoreKind,
    pub etcd: EtcdOptions,
    pub prefix: String,
    pub journal_dir: PathBuf,
    pub socket: PathBuf,
}

/// Parses durations like `2s`, `500ms`, `1m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: use like 2s, 500ms or 1m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration {s:?}: unit must be ms, s or m")),
    };
    if !(secs > 0.0 && secs <= 3600.0) {
        return Err(format!("duration {s:?} must be above 0 and at most 1h"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn read_pem(p: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("reading {what} {}: {e}", p.display()))
}

impl StoreArgs {
    /// Resolves flags/env over the config file over defaults.
    pub fn resolve(&self) -> Result<StoreConfig, String> {
        let file = self.load_file()?;
        let kind = self.store.or(file.store).unwrap_or(StoreKind::Etcd);
        let endpoints: Vec<String> = match (&self.etcd_endpoints, &file.endpoints) {
            (Some(s), _) | (None, Some(Endpoints::One(s))) => s
                .split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect(),
            (None, Some(Endpoints::List(l))) => l.clone(),
            (None, None) => vec!["http://127.0.0.1:2379".into()],
        };
        if endpoints.is_empty() {
            return Err("no etcd endpoints given".into());
        }
        for e in &endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(format!(
                    "etcd endpoint {e:?} must be a URL like http://127.0.0.1:2379"
                ));
            }
        }
        let timeout = match self.etcd_timeout.as_ref().or(file.timeout.as_ref()) {
            Some(t) => parse_duration(t)?,
            None => DEFAULT_TIMEOUT,
        };
        let prefix = self
            .etcd_prefix
            .clone()
            .or(file.prefix)
            .unwrap_or_else(|| DEFAULT_PREFIX.into());
        let pem = |flag: &Option<PathBuf>,
                   file_path: &Option<PathBuf>,
                   inline: &Option<String>,
                   what: &str|
         -> Result<Option<Vec<u8>>, String> {
            if let Some(p) = flag.as_ref().or(file_path.as_ref()) {
                return read_pem(p, what).map(Some);
            }
            Ok(inline.as_ref().map(|s| s.clone().into_bytes()))
        };
        let ca = pem(&self.etcd_tls_ca, &file.tls_ca_file, &file.tls_ca, "TLS CA")?;
        let cert = pem(
            &self.etcd_tls_cert,
            &file.tls_cert_file,
            &file.tls_cert,
            "TLS certificate",
        )?;
        let key = pem(
            &self.etcd_tls_key,
            &file.tls_key_file,
            &file.tls_key,
            "TLS key",
        )?;
        if cert.is_some() != key.is_some() {
            return Err("a TLS client certificate needs both a certificate and a key".into());
        }
        let tls = (ca.is_some() || cert.is_some()).then_some(TlsPem { ca, cert, key });
        let username = self.etcd_username.clone().or(file.username);
        let password = self.etcd_password.clone().or(file.password);
        if username.is_some() != password.is_some() {
            return Err("etcd authentication needs both a username and a password".into());
        }
        Ok(StoreConfig {
            kind,
            etcd: EtcdOptions {
                endpoints,
                timeout,
                username,
                password,
                tls,
            },
            prefix,
            journal_dir: self
                .journal_dir
                .clone()
                .or(file.journal_dir)
                .unwrap_or_else(|| PathBuf::from(crate::coilctl::DEFAULT_JOURNAL_DIR)),
            socket: self
                .socket
                .clone()
                .or(file.socket)
                .unwrap_or_else(|| PathBuf::from(crate::plugin::DEFAULT_SOCKET)),
        })
    }

    fn load_file(&self) -> Result<FileConfig, String> {
        let (path, explicit) = match &self.config {
            Some(p) => (p.clone(), true),
            None => match std::env::var_os("HOME") {
                Some(h) => (PathBuf::from(h).join(".coilctl.yml"), false),
                None => return Ok(FileConfig::default()),
            },
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(FileConfig::default())
            }
            Err(e) => return Err(format!("reading config {}: {e}", path.display())),
        };
        if text.trim().is_empty() {
            return Ok(FileConfig::default());
        }
        serde_yaml_ng::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn file_then_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("c.yml");
        std::fs::write(
            &f,
            "endpoints:\n  - http://10.0.0.1:2379\n  - http://10.0.0.2:2379\nprefix: /other/\ntimeout: 5s\n",
        )
        .expect("write");
        let mut a = StoreArgs {
            config: Some(f.clone()),
            ..Default::default()
        };
        let c = a.resolve().expect("resolve");
        assert_eq!(c.etcd.endpoints.len(), 2);
        assert_eq!(c.prefix, "/other/");
        assert_eq!(c.etcd.timeout, Duration::from_secs(5));
        a.etcd_endpoints = Some("http://127.0.0.1:1".into());
        a.etcd_prefix = Some("/flag/".into());
        let c = a.resolve().expect("resolve");
        assert_eq!(c.etcd.endpoints, vec!["http://127.0.0.1:1".to_string()]);
        assert_eq!(c.prefix, "/flag/");
        std::fs::write(&f, "endpoint: http://typo\n").expect("write");
        assert!(a.resolve().expect_err("typo").contains("unknown field"));
        let missing = StoreArgs {
            config: Some(dir.path().join("nope.yml")),
            ..Default::default()
        };
        assert!(missing.resolve().is_err(), "explicit config must exist");
    }
}
