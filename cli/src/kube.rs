//! The thin seam to the Kubernetes API: list Nodes (controller) and drop
//! boot taints from one Node (installer).
//!
//! It speaks plain HTTP/1.1 to an API endpoint that needs no client
//! authentication, such as `kubectl proxy` running next to the program
//! (the manifests' sidecar pattern), or a test's fake server. There is no
//! API server on the machine coil is developed on, so this is kept as small
//! as the two calls need; TLS and service-account tokens would go here.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A Kubernetes API endpoint (`http://host:port`).
#[derive(Debug, Clone)]
pub struct KubeApi {
    host: String,
    port: u16,
}

impl KubeApi {
    pub fn new(url: &str) -> Result<KubeApi, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("Kubernetes API URL {url:?} must be http:// (e.g. kubectl proxy)")
        })?;
        let hostport = rest.trim_end_matches('/');
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse().map_err(|_| format!("bad port in {url:?}"))?,
            ),
            None => (hostport.to_string(), 80),
        };
        Ok(KubeApi { host, port })
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nConnection: close\r\n",
            self.host
        );
        if body.is_some() {
            req.push_str(&format!(
                "Content-Type: application/merge-patch+json\r\nContent-Length: {}\r\n",
                payload.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(&payload);
        let exchange = async {
            let mut s = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
            s.write_all(req.as_bytes()).await?;
            let mut out = Vec::new();
            s.read_to_end(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        };
        let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .map_err(|_| format!("{method} {path}: no answer within 10s"))?
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("{method} {path}: malformed HTTP answer"))?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{method} {path}: no status"))?;
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        if !(200..300).contains(&status) {
            return Err(format!("{method} {path}: HTTP {status}: {}", body.trim()));
        }
        serde_json::from_str(&body).map_err(|e| format!("{method} {path}: {e}"))
    }

    /// Names of the Nodes that exist.
    pub async fn node_names(&self) -> Result<BTreeSet<String>, String> {
        let v = self.request("GET", "/api/v1/nodes", None).await?;
        Ok(v["items"]
            .as_array()
            .ok_or("GET /api/v1/nodes: no items")?
            .iter()
            .filter_map(|n| n["metadata"]["name"].as_str().map(String::from))
            .collect())
    }

    /// Removes the taints whose key is in `keys` from `node`; returns
    /// whether it changed anything.
    pub async fn remove_taints(&self, node: &str, keys: &[String]) -> Result<bool, String> {
        let path = format!("/api/v1/nodes/{node}");
        let n = self.request("GET", &path, None).await?;
        let taints: Vec<Value> = n["spec"]["taints"].as_array().cloned().unwrap_or_default();
        let kept: Vec<Value> = taints
            .iter()
            .filter(|t| !keys.iter().any(|k| t["key"].as_str() == Some(k.as_str())))
            .cloned()
            .collect();
        if kept.len() == taints.len() {
            return Ok(false);
        }
        self.request("PATCH", &path, Some(&json!({"spec": {"taints": kept}})))
            .await?;
        Ok(true)
    }
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_chunks() {
        assert!(KubeApi::new("https://x").is_err());
        let k = KubeApi::new("http://127.0.0.1:8001").expect("url");
        assert_eq!(k.port, 8001);
        assert_eq!(dechunk("4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n"), "abcdefg");
    }
}
