//! `coil`, the CNI plugin: a thin client of coild.
//!
//! It reads the CNI environment and the network configuration, answers
//! VERSION itself, and sends every other command to coild over its UNIX
//! socket, printing coild's answer. It does no kernel work, so every
//! effect is inside coild's journal. stdout carries only the protocol;
//! nothing is logged.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use coil::cni::{self, code, CniError, Command, Request, Response};

/// Where coild listens unless the configuration's `socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/coild.sock";
/// How long the plugin waits for coild's answer. An ADD that must lease a
/// block from etcd takes a few milliseconds; the bound is for a coild that
/// hangs.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the plugin; returns the exit code.
pub fn main() -> i32 {
    let mut stdin = Vec::new();
    let limit = (cni::MAX_STDIN + 1) as u64;
    if let Err(e) = std::io::stdin().take(limit).read_to_end(&mut stdin) {
        return fail(
            &CniError::new(code::IO, "cannot read the network configuration")
                .with_details(e.to_string()),
            "1.1.0",
        );
    }
    let env = |k: &str| std::env::var(k).ok();
    if env("CNI_COMMAND").as_deref() == Some("VERSION") {
        return print(&cni::version_result(&stdin), 0);
    }
    let version = conf_version(&stdin);
    let req = match cni::parse_request(env, &stdin) {
        Ok(r) => r,
        Err(e) => return fail(&e, &version),
    };
    let socket = req
        .conf
        .socket
        .clone()
        .unwrap_or_else(|| DEFAULT_SOCKET.to_string());
    match call(&socket, &req) {
        Ok(resp) => print(&resp.stdout, if resp.ok { 0 } else { 1 }),
        Err(e) => {
            let e = if req.command == Command::Status {
                CniError::new(code::NOT_AVAILABLE, e.msg).with_details(e.details)
            } else {
                e
            };
            fail(&e, &version)
        }
    }
}

/// The configuration's cniVersion when it names a supported one, so even
/// early errors answer in the caller's version.
fn conf_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|x| x.as_str())
                .map(String::from)
        })
        .filter(|v| cni::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".into())
}

fn print(v: &serde_json::Value, code: i32) -> i32 {
    if v.is_null() {
        // DEL, CHECK, GC and STATUS print nothing on success.
        return code;
    }
    let mut out = std::io::stdout().lock();
    let ok = serde_json::to_writer(&mut out, v).is_ok() && out.write_all(b"\n").is_ok();
    if ok {
        code
    } else {
        1
    }
}

fn fail(e: &CniError, version: &str) -> i32 {
    print(&e.to_json(version), 1)
}

/// Sends one request and reads one response.
fn call(socket: &str, req: &Request) -> Result<Response, CniError> {
    let unavailable = |what: &str, e: std::io::Error| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            format!("coild is not reachable at {socket}: {what}"),
        )
        .with_details(e.to_string())
    };
    let mut s = UnixStream::connect(socket).map_err(|e| unavailable("connect", e))?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT))
        .and_then(|_| s.set_write_timeout(Some(ANSWER_TIMEOUT)))
        .map_err(|e| unavailable("set timeout", e))?;
    let body = serde_json::to_vec(&coil::api::SocketRequest::Cni(req.clone()))
        .map_err(|e| CniError::new(code::INTERNAL, format!("encoding the request: {e}")))?;
    s.write_all(&body)
        .and_then(|_| s.shutdown(std::net::Shutdown::Write))
        .map_err(|e| unavailable("send", e))?;
    let mut answer = Vec::new();
    s.take(coil::api::MAX_ANSWER as u64)
        .read_to_end(&mut answer)
        .map_err(|e| unavailable("read the answer", e))?;
    serde_json::from_slice(&answer).map_err(|e| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            format!("coild at {socket} gave no valid answer"),
        )
        .with_details(e.to_string())
    })
}
