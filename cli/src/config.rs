//! The one configuration resolver of coild, coilctl and coil-controller.
//!
//! Each program reads its flags and environment through clap (flags win
//! over `COILD_*` / `COILCTL_*` / `COIL_CONTROLLER_*` variables), and coild
//! and coilctl a YAML file. This module turns those sources into settings:
//! [`EtcdSettings::over`] lays flags and env over the file, field by field,
//! and [`EtcdSettings::resolve`] applies the defaults, parses durations,
//! reads PEM files and checks what belongs together, with the same rules
//! and the same messages in all three programs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use coil_adapters::etcd::{EtcdOptions, TlsPem};
use serde::de::DeserializeOwned;

/// The default etcd key prefix.
pub const DEFAULT_PREFIX: &str = "/coil/";
/// The default per-request etcd deadline.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// A PEM given as a file path or, in coilctl's file, inline (as v1's
/// configs wrote them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pem {
    File(PathBuf),
    Inline(String),
}

impl Pem {
    fn read(&self, what: &str) -> Result<Vec<u8>, String> {
        match self {
            Pem::File(p) => {
                std::fs::read(p).map_err(|e| format!("reading {what} {}: {e}", p.display()))
            }
            Pem::Inline(s) => Ok(s.clone().into_bytes()),
        }
    }
}

/// The etcd settings one source gives; `None` where it says nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdSettings {
    pub endpoints: Option<Vec<String>>,
    pub prefix: Option<String>,
    pub timeout: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls_ca: Option<Pem>,
    pub tls_cert: Option<Pem>,
    pub tls_key: Option<Pem>,
}

/// Resolved etcd settings.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub options: EtcdOptions,
    pub prefix: String,
}

impl EtcdSettings {
    /// These settings (flags and environment), each falling back to the
    /// same field of `file`.
    pub fn over(self, file: EtcdSettings) -> EtcdSettings {
        EtcdSettings {
            endpoints: self.endpoints.or(file.endpoints),
            prefix: self.prefix.or(file.prefix),
            timeout: self.timeout.or(file.timeout),
            username: self.username.or(file.username),
            password: self.password.or(file.password),
            tls_ca: self.tls_ca.or(file.tls_ca),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
        }
    }

    /// Applies the defaults (endpoints `default_endpoints`, an error when
    /// there is none; prefix /coil/; deadline 2 s), parses and checks.
    pub fn resolve(self, default_endpoints: Result<&str, &str>) -> Result<EtcdConfig, String> {
        let endpoints = match self.endpoints {
            Some(e) => e,
            None => split_endpoints(default_endpoints.map_err(str::to_string)?),
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
        let timeout = match &self.timeout {
            Some(t) => parse_duration(t)?,
            None => DEFAULT_TIMEOUT,
        };
        // The store checks the prefix itself (Keys::new).
        let prefix = self.prefix.unwrap_or_else(|| DEFAULT_PREFIX.into());
        let read = |p: &Option<Pem>, what: &str| p.as_ref().map(|p| p.read(what)).transpose();
        let ca = read(&self.tls_ca, "TLS CA")?;
        let cert = read(&self.tls_cert, "TLS certificate")?;
        let key = read(&self.tls_key, "TLS key")?;
        if cert.is_some() != key.is_some() {
            return Err("a TLS client certificate needs both a certificate and a key".into());
        }
        if self.username.is_some() != self.password.is_some() {
            return Err("etcd authentication needs both a username and a password".into());
        }
        Ok(EtcdConfig {
            options: EtcdOptions {
                endpoints,
                timeout,
                username: self.username,
                password: self.password,
                tls: (ca.is_some() || cert.is_some()).then_some(TlsPem { ca, cert, key }),
            },
            prefix,
        })
    }
}

/// `a,b, c` as endpoints (empty items dropped).
pub fn split_endpoints(s: &str) -> Vec<String> {
    s.split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect()
}

/// A file path as a PEM source.
pub fn pem_file(p: Option<PathBuf>) -> Option<Pem> {
    p.map(Pem::File)
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

/// Reads a YAML config file: `explicit` must exist; `default` is read
/// only when it exists. Neither, or an empty file: the type's defaults.
pub fn load_yaml<T: DeserializeOwned + Default>(
    explicit: Option<&Path>,
    default: Option<&Path>,
) -> Result<T, String> {
    let path = match (explicit, default) {
        (Some(p), _) => p,
        (None, Some(p)) if p.exists() => p,
        _ => return Ok(T::default()),
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading config {}: {e}", path.display()))?;
    if text.trim().is_empty() {
        return Ok(T::default());
    }
    serde_yaml_ng::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn given(endpoints: &str) -> EtcdSettings {
        EtcdSettings {
            endpoints: Some(split_endpoints(endpoints)),
            ..EtcdSettings::default()
        }
    }

    #[test]
    fn flags_win_over_the_file_field_by_field() {
        let flags = EtcdSettings {
            timeout: Some("5s".into()),
            ..given("http://a:2379")
        };
        let file = EtcdSettings {
            prefix: Some("/x/".into()),
            timeout: Some("1s".into()),
            ..given("http://b:2379")
        };
        let c = flags.over(file).resolve(Err("unused")).expect("resolve");
        assert_eq!(c.options.endpoints, vec!["http://a:2379"]);
        assert_eq!(c.prefix, "/x/");
        assert_eq!(c.options.timeout, Duration::from_secs(5));
    }

    #[test]
    fn defaults_apply_or_their_absence_is_named() {
        let c = EtcdSettings::default()
            .resolve(Ok("http://127.0.0.1:2379"))
            .expect("default");
        assert_eq!(c.options.endpoints, vec!["http://127.0.0.1:2379"]);
        assert_eq!(
            (c.prefix.as_str(), c.options.timeout),
            ("/coil/", DEFAULT_TIMEOUT)
        );
        let e = EtcdSettings::default()
            .resolve(Err("--store etcd needs --etcd-endpoints"))
            .expect_err("no default");
        assert_eq!(e, "--store etcd needs --etcd-endpoints");
    }

    #[test]
    fn what_belongs_together_is_checked_with_one_message() {
        for (s, want) in [
            (given(""), "no etcd endpoints given"),
            (given("127.0.0.1:2379"), "must be a URL"),
            (
                EtcdSettings {
                    timeout: Some("61m".into()),
                    ..given("http://a:1")
                },
                "at most 1h",
            ),
            (
                EtcdSettings {
                    username: Some("u".into()),
                    ..given("http://a:1")
                },
                "both a username and a password",
            ),
            (
                EtcdSettings {
                    tls_cert: Some(Pem::Inline("c".into())),
                    ..given("http://a:1")
                },
                "both a certificate and a key",
            ),
            (
                EtcdSettings {
                    tls_ca: Some(Pem::File("/nonexistent/ca.pem".into())),
                    ..given("http://a:1")
                },
                "reading TLS CA /nonexistent/ca.pem",
            ),
        ] {
            let e = s.resolve(Err("unused")).expect_err(want);
            assert!(e.contains(want), "{e:?} should say {want:?}");
        }
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3h").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn an_explicit_config_file_must_exist_a_default_one_may_not() {
        #[derive(Debug, Default, serde::Deserialize)]
        struct F {
            #[allow(dead_code)]
            a: Option<u32>,
        }
        let missing = Path::new("/nonexistent/coil.yml");
        assert!(load_yaml::<F>(Some(missing), None).is_err());
        assert!(load_yaml::<F>(None, Some(missing)).is_ok());
    }
}
