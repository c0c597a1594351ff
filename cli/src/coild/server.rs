//! coild's UNIX socket: one JSON request, one JSON answer per connection,
//! each connection on its own task (requests run concurrently).

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use coil::cni::{code, CniError, Request, Response};
use coil::store::remote::{serve_rpc, StoreCall};
use coil::store::Backend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::daemon::{Daemon, FatalError};

/// Largest request accepted (the network configuration is at most 1 MiB).
const MAX_REQUEST: u64 = 2 << 20;
/// A client that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the socket (mode 0600, replacing a stale one) and serves until
/// `shutdown` resolves.
pub async fn serve<B: Backend>(
    d: Arc<Daemon<B>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), FatalError> {
    let path = d.config().socket.clone();
    let fatal = |m: String| FatalError {
        msg: m,
        code: coil::exit::PROBLEMS,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| fatal(format!("creating {}: {e}", dir.display())))?;
    }
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(fatal(format!(
                "removing stale socket {}: {e}",
                path.display()
            )))
        }
    }
    let listener =
        UnixListener::bind(&path).map_err(|e| fatal(format!("binding {}: {e}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| fatal(format!("chmod {}: {e}", path.display())))?;
    tracing::info!(socket = %path.display(), node = %d.config().node_name, "coild ready");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            acc = listener.accept() => match acc {
                Ok((stream, _)) => {
                    let d = d.clone();
                    tokio::spawn(async move {
                        if let Err(e) = connection(d, stream).await {
                            tracing::debug!("connection: {e}");
                        }
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

/// `{"repair":{"dry_run":bool}}`: run recovery now (coilctl node repair).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Repair {
    repair: RepairArgs,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RepairArgs {
    #[serde(default)]
    dry_run: bool,
}

/// `{"stats":{}}`: coild's counters.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Stats {
    #[allow(dead_code)]
    stats: serde_json::Value,
}

async fn connection<B: Backend>(d: Arc<Daemon<B>>, mut s: UnixStream) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut limited = (&mut s).take(MAX_REQUEST + 1);
    let read = limited.read_to_end(&mut buf);
    let resp = match tokio::time::timeout(READ_TIMEOUT, read).await {
        Err(_) => Response::err(
            &CniError::new(code::IO, "request not received in time"),
            "1.1.0",
        ),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) if buf.len() as u64 > MAX_REQUEST => Response::err(
            &CniError::new(code::INVALID_CONFIG, "request too large"),
            "1.1.0",
        ),
        Ok(Ok(_)) => match serde_json::from_slice::<Request>(&buf) {
            Ok(req) => d.handle(req).await,
            Err(e) => match serde_json::from_slice::<StoreCall>(&buf) {
                // coilctl reaching the embedded store through coild.
                Ok(call) => {
                    let reply = serve_rpc(d.store_backend(), call.store).await;
                    let body = serde_json::to_vec(&reply).unwrap_or_default();
                    s.write_all(&body).await?;
                    return s.shutdown().await;
                }
                Err(_) if serde_json::from_slice::<Repair>(&buf).is_ok() => {
                    let dry_run = serde_json::from_slice::<Repair>(&buf)
                        .map(|r| r.repair.dry_run)
                        .unwrap_or(true);
                    let v = match d.recover(dry_run, true).await {
                        Ok(out) => serde_json::json!({
                            "node": d.config().node_name,
                            "steps": out.into_iter().map(crate::ctl_repair::Step::from_outcome).collect::<Vec<_>>(),
                        }),
                        Err(e) => serde_json::json!({"error": e.to_string()}),
                    };
                    let body = serde_json::to_vec(&v).unwrap_or_default();
                    s.write_all(&body).await?;
                    return s.shutdown().await;
                }
                Err(_) if serde_json::from_slice::<Stats>(&buf).is_ok() => {
                    let body = serde_json::to_vec(&d.stats()).unwrap_or_default();
                    s.write_all(&body).await?;
                    return s.shutdown().await;
                }
                Err(_) => Response::err(
                    &CniError::new(code::DECODE, "malformed request").with_details(e.to_string()),
                    "1.1.0",
                ),
            },
        },
    };
    let body = serde_json::to_vec(&resp).unwrap_or_default();
    s.write_all(&body).await?;
    s.shutdown().await
}
