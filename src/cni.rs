//! The CNI protocol, pure: parsing the runtime's environment and network
//! configuration, the error codes, and rendering results in the version the
//! configuration asks for. No I/O; the `coil` plugin and coild both use it.
//!
//! Error codes live in [`code`], and every coil error is mapped to one of
//! them in exactly one place ([`CniError`] constructors and
//! `coild`'s `error_code`).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Spec versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Largest network configuration accepted on stdin.
pub const MAX_STDIN: usize = 1 << 20;

/// CNI error codes (SPEC "Error" section) and coil's own (100+).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD now.
    pub const NOT_AVAILABLE: u32 = 50;
    /// STATUS: not available, and existing pods may have limited
    /// connectivity.
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// An internal error in coild.
    pub const INTERNAL: u32 = 100;
    /// The pod's pool has no free address and no free block.
    pub const POOL_EXHAUSTED: u32 = 101;
    /// The interface name is already taken inside the pod's netns.
    pub const INTERFACE_EXISTS: u32 = 102;
    /// The pod's network namespace does not exist.
    pub const NETNS_MISSING: u32 = 103;
    /// The kernel refused a change (netlink error).
    pub const KERNEL: u32 = 104;
    /// The node's journal refused or failed a write.
    pub const JOURNAL: u32 = 105;
    /// The pool (or the default pool) does not exist.
    pub const NO_POOL: u32 = 106;
    /// CHECK found the kernel different from the journal.
    pub const CHECK_FAILED: u32 = 107;
}

/// A CNI error as printed on stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("CNI error {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, d: impl Into<String>) -> CniError {
        self.details = d.into();
        self
    }

    /// The JSON object for stdout.
    pub fn to_json(&self, version: &str) -> Value {
        let mut v = json!({"cniVersion": version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

/// The CNI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            _ => return None,
        })
    }
}

/// One attachment named in `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// What coild needs from the network configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    /// coild's socket (the `socket` key), if the configuration names one.
    pub socket: Option<String>,
    pub prev_result: Option<Value>,
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

/// Does this configuration version have CHECK (0.4.0 and later)?
pub fn has_check(version: &str) -> bool {
    version != "0.3.0" && version != "0.3.1"
}

/// Parses the network configuration from stdin.
pub fn parse_netconf(stdin: &[u8]) -> Result<NetConf, CniError> {
    if stdin.len() > MAX_STDIN {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "network configuration of {} bytes exceeds the {MAX_STDIN}-byte limit",
                stdin.len()
            ),
        ));
    }
    let v: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(code::DECODE, "cannot decode the network configuration")
            .with_details(e.to_string())
    })?;
    let obj = v.as_object().ok_or_else(|| {
        CniError::new(
            code::DECODE,
            "the network configuration is not a JSON object",
        )
    })?;
    let version = match obj.get("cniVersion") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "cniVersion must be a string",
            ))
        }
        None => return Err(CniError::new(code::INVALID_CONFIG, "cniVersion is missing")),
    };
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {version:?} is not supported"),
        )
        .with_details(format!("supported: {}", SUPPORTED_VERSIONS.join(", "))));
    }
    let name = match obj.get("name") {
        Some(Value::String(s)) if crate::journal::valid_network_name(s) => s.clone(),
        Some(Value::String(s)) => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "network name {s:?} is not valid: 1-{} characters of [A-Za-z0-9_.-] \
                     starting with a letter or digit (CNI spec)",
                    crate::journal::MAX_NETWORK_NAME
                ),
            ))
        }
        _ => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "name is missing or not a non-empty string",
            ))
        }
    };
    let socket = match obj.get("socket") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.starts_with('/') => Some(s.clone()),
        Some(_) => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "socket must be an absolute path to coild's socket",
            ))
        }
    };
    let valid_attachments = match obj.get("cni.dev/valid-attachments") {
        None | Some(Value::Null) => None,
        Some(v) => Some(serde_json::from_value(v.clone()).map_err(|e| {
            CniError::new(
                code::INVALID_CONFIG,
                "cni.dev/valid-attachments must be a list of {containerID, ifname}",
            )
            .with_details(e.to_string())
        })?),
    };
    Ok(NetConf {
        cni_version: version,
        name,
        socket,
        prev_result: obj.get("prevResult").cloned().filter(|v| !v.is_null()),
        valid_attachments,
    })
}

/// Pod identity from CNI_ARGS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodArgs {
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// Parses CNI_ARGS (`K=V;K=V`). Unknown keys are ignored whatever
/// `IgnoreUnknown` says: coil only reads the pod's namespace and name.
pub fn parse_cni_args(s: &str) -> Result<PodArgs, CniError> {
    let mut out = PodArgs::default();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
            )
        })?;
        match k {
            "K8S_POD_NAMESPACE" if !v.is_empty() => out.namespace = Some(v.to_string()),
            "K8S_POD_NAME" if !v.is_empty() => out.name = Some(v.to_string()),
            _ => {}
        }
    }
    Ok(out)
}

/// A validated request, as the plugin sends it to coild.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<String>,
    pub ifname: String,
    pub pod: PodArgs,
    pub conf: NetConf,
}

/// Container ids: `[A-Za-z0-9_.-]`, at most as long as the journal keeps
/// (so an id is refused before anything is leased, not after).
fn valid_container_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= crate::journal::MAX_CONTAINER_ID
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// Interface names: what the kernel accepts (IFNAMSIZ, no '/', ':' or
/// whitespace, not "." or "..").
pub fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 16
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// Builds a request from the CNI environment and stdin. `env` reads one
/// variable. VERSION needs neither environment nor a valid configuration
/// and is answered by [`version_result`] instead.
pub fn parse_request(
    env: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> Result<Request, CniError> {
    let cmd_s = env("CNI_COMMAND")
        .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set"))?;
    let command = Command::parse(&cmd_s).ok_or_else(|| {
        CniError::new(
            code::INVALID_ENV,
            format!("CNI_COMMAND {cmd_s:?} is not one of ADD, DEL, CHECK, VERSION, GC, STATUS"),
        )
    })?;
    let conf = parse_netconf(stdin)?;
    let need_container = matches!(command, Command::Add | Command::Del | Command::Check);
    let get = |k: &str| env(k).filter(|v| !v.is_empty());
    let container_id = match get("CNI_CONTAINERID") {
        Some(c) if valid_container_id(&c) => c,
        Some(c) => {
            let shown: String = c.chars().take(80).collect();
            return Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "CNI_CONTAINERID {shown:?}{} must be 1-{} characters of [A-Za-z0-9_.-]",
                    if shown.len() < c.len() { "..." } else { "" },
                    crate::journal::MAX_CONTAINER_ID
                ),
            ));
        }
        None if need_container => {
            return Err(CniError::new(
                code::INVALID_ENV,
                "CNI_CONTAINERID is not set",
            ))
        }
        None => String::new(),
    };
    let ifname = match get("CNI_IFNAME") {
        Some(i) if valid_ifname(&i) => i,
        Some(i) => {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_IFNAME {i:?} is not a valid interface name"),
            ))
        }
        None if need_container => {
            return Err(CniError::new(code::INVALID_ENV, "CNI_IFNAME is not set"))
        }
        None => String::new(),
    };
    let netns = get("CNI_NETNS");
    if netns.is_none() && matches!(command, Command::Add | Command::Check) {
        return Err(CniError::new(code::INVALID_ENV, "CNI_NETNS is not set"));
    }
    if let Some(n) = &netns {
        if !n.starts_with('/') {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_NETNS {n:?} is not an absolute path"),
            ));
        }
    }
    if command == Command::Check && !has_check(&conf.cni_version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CHECK needs cniVersion 0.4.0 or later, not {}",
                conf.cni_version
            ),
        ));
    }
    if matches!(command, Command::Gc | Command::Status) && conf.cni_version != "1.1.0" {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("{cmd_s} needs cniVersion 1.1.0, not {}", conf.cni_version),
        ));
    }
    if command == Command::Gc && conf.valid_attachments.is_none() {
        // Without the list every attachment of the network would look
        // stale: refuse rather than release pods that are in use.
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "GC of network {:?} needs cni.dev/valid-attachments; nothing was released",
                conf.name
            ),
        ));
    }
    let pod = parse_cni_args(&env("CNI_ARGS").unwrap_or_default())?;
    Ok(Request {
        command,
        container_id,
        netns,
        ifname,
        pod,
        conf,
    })
}

/// The VERSION answer.
pub fn version_result(stdin: &[u8]) -> Value {
    // The runtime sends {"cniVersion": "..."}; answer in that version when
    // we know it, else in the newest.
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".into());
    json!({"cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS})
}

/// One interface of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    /// The netns path for the container side; None for the host side.
    pub sandbox: Option<String>,
}

/// One address of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// The address with its prefix (/32 or /128).
    pub address: IpNet,
    pub gateway: IpAddr,
    /// Index into the interfaces.
    pub interface: usize,
}

/// A route of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    pub gw: IpAddr,
}

/// The version-independent result of an ADD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
}

impl AddResult {
    /// Renders the result for `version` (0.3.x and 0.4.0 carry an IP
    /// `version` field; 1.x does not).
    pub fn render(&self, version: &str) -> Value {
        let old = version.starts_with("0.");
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut v = json!({"name": i.name, "mac": i.mac});
                if let Some(s) = &i.sandbox {
                    v["sandbox"] = Value::String(s.clone());
                }
                v
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut v = json!({
                    "address": ip.address.to_string(),
                    "gateway": ip.gateway.to_string(),
                    "interface": ip.interface,
                });
                if old {
                    v["version"] = Value::String(
                        if ip.address.addr().is_ipv4() {
                            "4"
                        } else {
                            "6"
                        }
                        .into(),
                    );
                }
                v
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| json!({"dst": r.dst.to_string(), "gw": r.gw.to_string()}))
            .collect();
        json!({
            "cniVersion": version,
            "interfaces": interfaces,
            "ips": ips,
            "routes": routes,
            "dns": {},
        })
    }

    /// Honours a chained `prevResult`: interfaces, addresses and routes of
    /// earlier plugins are kept, ours appended (interface indexes shifted).
    pub fn render_with_prev(&self, version: &str, prev: Option<&Value>) -> Value {
        let mut out = self.render(version);
        let Some(prev) = prev else { return out };
        let take = |k: &str| -> Vec<Value> {
            prev.get(k)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let prev_ifaces = take("interfaces");
        let shift = prev_ifaces.len();
        let mut ifaces = prev_ifaces;
        ifaces.extend(out["interfaces"].as_array().cloned().unwrap_or_default());
        let mut ips = take("ips");
        for mut ip in out["ips"].as_array().cloned().unwrap_or_default() {
            if let Some(i) = ip.get("interface").and_then(Value::as_u64) {
                ip["interface"] = json!(i as usize + shift);
            }
            ips.push(ip);
        }
        let mut routes = take("routes");
        routes.extend(out["routes"].as_array().cloned().unwrap_or_default());
        out["interfaces"] = Value::Array(ifaces);
        out["ips"] = Value::Array(ips);
        out["routes"] = Value::Array(routes);
        if let Some(dns) = prev.get("dns") {
            out["dns"] = dns.clone();
        }
        out
    }
}

/// What coild answers the plugin: the exact stdout, and whether it is an
/// error (non-zero exit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub stdout: Value,
}

impl Response {
    pub fn ok(v: Value) -> Response {
        Response {
            ok: true,
            stdout: v,
        }
    }

    pub fn err(e: &CniError, version: &str) -> Response {
        Response {
            ok: false,
            stdout: e.to_json(version),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    const CONF: &[u8] = br#"{"cniVersion":"1.0.0","name":"k8s","type":"coil"}"#;

    #[test]
    fn add_needs_its_environment() {
        let full = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAME=p;FOO=bar;K8S_POD_NAMESPACE=ns",
            ),
        ];
        let r = parse_request(env(&full), CONF).expect("valid");
        assert_eq!(r.command, Command::Add);
        assert_eq!(r.pod.namespace.as_deref(), Some("ns"));
        assert_eq!(r.pod.name.as_deref(), Some("p"));
        for missing in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            let vars: Vec<(&str, &str)> = full
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let e = parse_request(env(&vars), CONF).expect_err(missing);
            assert_eq!(e.code, code::INVALID_ENV, "{missing}: {e}");
        }
    }

    #[test]
    fn del_without_netns_is_fine() {
        let vars = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ];
        let r = parse_request(env(&vars), CONF).expect("valid");
        assert_eq!(r.netns, None);
    }

    #[test]
    fn config_errors_have_their_codes() {
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
        ];
        let code_of = |conf: &[u8]| parse_request(env(&vars), conf).expect_err("bad").code;
        assert_eq!(code_of(b"{not json"), code::DECODE);
        assert_eq!(code_of(b"[1,2]"), code::DECODE);
        assert_eq!(code_of(br#"{"name":"x"}"#), code::INVALID_CONFIG);
        assert_eq!(
            code_of(br#"{"cniVersion":"9.9.9","name":"x"}"#),
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(code_of(br#"{"cniVersion":"1.0.0"}"#), code::INVALID_CONFIG);
        assert_eq!(
            code_of(br#"{"cniVersion":"1.0.0","name":"x","socket":"rel"}"#),
            code::INVALID_CONFIG
        );
        let big = vec![b' '; MAX_STDIN + 1];
        assert_eq!(code_of(&big), code::INVALID_CONFIG);
        let bad_if = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "way-too-long-ifname"),
        ];
        assert_eq!(
            parse_request(env(&bad_if), CONF).expect_err("ifname").code,
            code::INVALID_ENV
        );
    }

    #[test]
    fn versions_render_their_shape() {
        let r = AddResult {
            interfaces: vec![
                Interface {
                    name: "coilabc".into(),
                    mac: "aa:bb:cc:dd:ee:ff".into(),
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: "aa:bb:cc:dd:ee:00".into(),
                    sandbox: Some("/run/netns/x".into()),
                },
            ],
            ips: vec![IpConfig {
                address: "10.0.0.5/32".parse().expect("net"),
                gateway: "169.254.1.1".parse().expect("ip"),
                interface: 1,
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().expect("net"),
                gw: "169.254.1.1".parse().expect("ip"),
            }],
        };
        let v1 = r.render("1.0.0");
        assert_eq!(v1["cniVersion"], "1.0.0");
        assert!(v1["ips"][0].get("version").is_none());
        let v03 = r.render("0.3.1");
        assert_eq!(v03["ips"][0]["version"], "4");
        let prev = json!({"interfaces":[{"name":"x"}],"ips":[{"address":"192.0.2.1/24","interface":0}],"routes":[]});
        let chained = r.render_with_prev("1.0.0", Some(&prev));
        assert_eq!(chained["interfaces"].as_array().map(Vec::len), Some(3));
        assert_eq!(chained["ips"][1]["interface"], 2);
    }

    #[test]
    fn version_answers_in_the_asked_version() {
        let v = version_result(br#"{"cniVersion":"0.4.0"}"#);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"].as_array().map(Vec::len), Some(5));
        assert_eq!(version_result(b"")["cniVersion"], "1.1.0");
    }

    #[test]
    fn cni_args_malformed() {
        assert!(parse_cni_args("K8S_POD_NAME").is_err());
        assert_eq!(parse_cni_args("").expect("empty"), PodArgs::default());
    }
}
