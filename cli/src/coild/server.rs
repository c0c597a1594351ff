//! coild's UNIX socket: one [`SocketRequest`] and one JSON answer per
//! connection, each connection on its own task (requests run
//! concurrently).
//!
//! The socket is created safely (restrictive umask before bind, mode 0600,
//! a non-socket at the path or a live coild behind it refuses the start),
//! connections are capped, and every read and write is bounded in size and
//! time, so no client can exhaust coild or hang it.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use coil::api::{RepairAnswer, SocketRequest, MAX_REQUEST};
use coil::cni::{code, CniError, Response};
use coil::store::rpc::{serve_rpc, StoreReply, StoreRpc};
use coil::store::{Backend, BackendError, BackendErrorKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::daemon::{Daemon, FatalError};

/// A client that has not sent its whole request by then is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that does not take its answer by then is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 256;

fn fatal(msg: String) -> FatalError {
    FatalError {
        msg,
        code: coil::exit::PROBLEMS,
    }
}

/// Makes the socket path free for a new bind: nothing there, or a stale
/// socket nobody answers on. A live coild, or anything that is not a
/// socket, refuses the start. coild calls it first thing, before it opens
/// its journal or touches the kernel, and again right before binding.
pub fn clear_path(path: &Path) -> Result<(), FatalError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(fatal(format!("inspecting {}: {e}", path.display()))),
    };
    if !meta.file_type().is_socket() {
        return Err(fatal(format!(
            "refusing to start: {} exists and is not a socket; remove it or choose \
             another --socket",
            path.display()
        )));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(fatal(format!(
            "refusing to start: another coild answers on {}",
            path.display()
        ))),
        Err(_) => std::fs::remove_file(path)
            .map_err(|e| fatal(format!("removing stale socket {}: {e}", path.display()))),
    }
}

/// Binds with a umask of 077, so the socket is never reachable by others,
/// not even between bind and chmod.
fn bind_private(path: &Path) -> Result<UnixListener, FatalError> {
    use nix::sys::stat::{umask, Mode};
    let old = umask(Mode::from_bits_truncate(0o077));
    let r = UnixListener::bind(path);
    umask(old);
    let l = r.map_err(|e| fatal(format!("binding {}: {e}", path.display())))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| fatal(format!("chmod {}: {e}", path.display())))?;
    Ok(l)
}

/// Binds the socket and serves until `shutdown` resolves.
pub async fn serve<B: Backend>(
    d: Arc<Daemon<B>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), FatalError> {
    let path = d.config().socket.clone();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| fatal(format!("creating {}: {e}", dir.display())))?;
    }
    clear_path(&path)?;
    let listener = bind_private(&path)?;
    tracing::info!(socket = %path.display(), node = %d.config().node_name, "coild ready");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        // Wait for a free slot first: at the cap, new clients queue in the
        // listen backlog instead of costing coild memory.
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        tokio::select! {
            _ = &mut shutdown => break,
            acc = listener.accept() => match acc {
                Ok((stream, _)) => {
                    let d = d.clone();
                    tokio::spawn(async move {
                        if let Err(e) = connection(d, stream).await {
                            tracing::debug!("connection: {e}");
                        }
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    let _ = std::fs::remove_file(&path);
    tracing::info!("coild stopped");
    Ok(())
}

/// Reads one request: at most [`MAX_REQUEST`] bytes within
/// [`READ_TIMEOUT`]. Err carries the CNI error to answer with.
async fn read_request(s: &mut UnixStream) -> Result<Vec<u8>, CniError> {
    let mut buf = Vec::new();
    let mut limited = (&mut *s).take(MAX_REQUEST as u64 + 1);
    match tokio::time::timeout(READ_TIMEOUT, limited.read_to_end(&mut buf)).await {
        Err(_) => Err(CniError::new(code::IO, "request not received in time")),
        Ok(Err(e)) => {
            Err(CniError::new(code::IO, "reading the request").with_details(e.to_string()))
        }
        Ok(Ok(_)) if buf.len() > MAX_REQUEST => Err(CniError::new(
            code::INVALID_CONFIG,
            format!("request larger than {MAX_REQUEST} bytes"),
        )),
        Ok(Ok(_)) => Ok(buf),
    }
}

/// Most input read and thrown away after refusing a request.
const DRAIN_MAX: u64 = 64 << 20;
/// Longest time spent doing so.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Takes (and drops) what a refused caller is still sending, within
/// bounds: closing a Unix socket with unread input resets the connection,
/// and the caller could then lose the answer before it reads it (an
/// oversized request's "request larger than ..." error, say).
async fn drain(s: &mut UnixStream) {
    let mut limited = (&mut *s).take(DRAIN_MAX);
    let _ = tokio::time::timeout(
        DRAIN_TIMEOUT,
        tokio::io::copy(&mut limited, &mut tokio::io::sink()),
    )
    .await;
}

async fn answer(s: &mut UnixStream, v: &impl serde::Serialize) -> std::io::Result<()> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let write = async {
        s.write_all(&body).await?;
        s.shutdown().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "client did not take the answer in time",
        )),
    }
}

fn refused_store_call(op: &str, why: String) -> StoreReply {
    StoreReply::Err(BackendError {
        kind: BackendErrorKind::Rejected,
        op: op.to_string(),
        key: "-".into(),
        endpoint: "coild".into(),
        message: why,
    })
}

/// Serves an embedded-store call, inside coil's prefix only.
async fn store_call<B: Backend>(d: &Daemon<B>, rpc: StoreRpc) -> StoreReply {
    if !d.embedded_store() {
        return refused_store_call(
            "store call",
            "coild runs with etcd: coilctl talks to etcd directly, not through coild".into(),
        );
    }
    if let StoreRpc::Txn { op, txn } = &rpc {
        if let Err(why) = txn.confined_to(d.store_prefix().as_bytes()) {
            return refused_store_call(op, why);
        }
    }
    serve_rpc(d.store_backend(), rpc).await
}

async fn connection<B: Backend>(d: Arc<Daemon<B>>, mut s: UnixStream) -> std::io::Result<()> {
    let t0 = std::time::Instant::now();
    let buf = match read_request(&mut s).await {
        Ok(b) => b,
        Err(e) => {
            let r = answer(&mut s, &Response::err(&e, "1.1.0")).await;
            drain(&mut s).await;
            return r;
        }
    };
    let req = match SocketRequest::decode(&buf) {
        Ok(r) => r,
        Err(why) => {
            d.count_rejected();
            let e = CniError::new(code::DECODE, "malformed request").with_details(why);
            return answer(&mut s, &Response::err(&e, "1.1.0")).await;
        }
    };
    match req {
        SocketRequest::Cni(r) => {
            let t1 = t0.elapsed();
            let resp = d.handle(r).await;
            let t2 = t0.elapsed();
            let r = answer(&mut s, &resp).await;
            tracing::debug!(
                read_us = t1.as_micros() as u64,
                handle_us = (t2 - t1).as_micros() as u64,
                answer_us = (t0.elapsed() - t2).as_micros() as u64,
                "connection"
            );
            r
        }
        SocketRequest::Store(rpc) => {
            let reply = store_call(&d, rpc).await;
            answer(&mut s, &reply).await
        }
        SocketRequest::Repair { apply } => {
            let a = match d.recover(!apply, true, true).await {
                Ok(out) => RepairAnswer {
                    node: d.config().node_name.clone(),
                    applied: apply,
                    steps: out
                        .into_iter()
                        .map(crate::ctl_repair::Step::from_outcome)
                        .filter_map(|st| serde_json::to_value(st).ok())
                        .collect(),
                    error: None,
                },
                Err(e) => RepairAnswer {
                    node: d.config().node_name.clone(),
                    applied: false,
                    steps: Vec::new(),
                    error: Some(e.to_string()),
                },
            };
            answer(&mut s, &a).await
        }
        SocketRequest::Stats {} => answer(&mut s, &d.stats()).await,
        SocketRequest::Health {} => answer(&mut s, &d.health()).await,
    }
}
