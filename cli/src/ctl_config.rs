//! coilctl's store configuration: flags, then `COILCTL_*` environment
//! (clap reads both), then a YAML config file (`--config`, else
//! `~/.coilctl.yml` when it exists), then defaults — the same precedence
//! and the same file keys as coil v1.

use std::path::PathBuf;

use crate::config::{pem_file, split_endpoints, EtcdSettings, Pem};
use clap::Args;
use coil_adapters::etcd::EtcdOptions;
use serde::Deserialize;

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

impl StoreArgs {
    /// Resolves flags/env over the config file over defaults
    /// ([`crate::config`]).
    pub fn resolve(&self) -> Result<StoreConfig, String> {
        let file = self.load_file()?;
        let kind = self.store.or(file.store).unwrap_or(StoreKind::Etcd);
        let pem = |path: &Option<PathBuf>, inline: &Option<String>| {
            path.clone()
                .map(Pem::File)
                .or_else(|| inline.clone().map(Pem::Inline))
        };
        let from_file = EtcdSettings {
            endpoints: file.endpoints.as_ref().map(|e| match e {
                Endpoints::One(s) => split_endpoints(s),
                Endpoints::List(l) => l.clone(),
            }),
            prefix: file.prefix.clone(),
            timeout: file.timeout.clone(),
            username: file.username.clone(),
            password: file.password.clone(),
            tls_ca: pem(&file.tls_ca_file, &file.tls_ca),
            tls_cert: pem(&file.tls_cert_file, &file.tls_cert),
            tls_key: pem(&file.tls_key_file, &file.tls_key),
        };
        let given = EtcdSettings {
            endpoints: self.etcd_endpoints.as_deref().map(split_endpoints),
            prefix: self.etcd_prefix.clone(),
            timeout: self.etcd_timeout.clone(),
            username: self.etcd_username.clone(),
            password: self.etcd_password.clone(),
            tls_ca: pem_file(self.etcd_tls_ca.clone()),
            tls_cert: pem_file(self.etcd_tls_cert.clone()),
            tls_key: pem_file(self.etcd_tls_key.clone()),
        };
        let etcd = given.over(from_file).resolve(Ok("http://127.0.0.1:2379"))?;
        Ok(StoreConfig {
            kind,
            etcd: etcd.options,
            prefix: etcd.prefix,
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
        let default = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".coilctl.yml"));
        crate::config::load_yaml(self.config.as_deref(), default.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
