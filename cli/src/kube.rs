//! The thin seam to the Kubernetes API: list Nodes (controller) and drop
//! boot taints from one Node (installer).
//!
//! It speaks plain HTTP/1.1 to an API endpoint that needs no client
//! authentication, such as `kubectl proxy` running next to the program
//! (the manifests' sidecar pattern), or a test's fake server. There is no
//! API server on the machine coil is developed on, so this is kept as small
//! as the two calls need; TLS and service-account tokens would go here.
//!
//! Whatever the other end sends, this module answers with a value or an
//! error, never a panic: the answer is read as bytes up to a size cap
//! ([`MAX_ANSWER`]), its framing (status line, `Content-Length`, chunked
//! encoding) is checked so that a truncated answer is an error rather than
//! a shorter document, and the body is decoded from bytes only once it is
//! whole. A Node list is accepted only when it is complete: a `NodeList`
//! with `items`, every page of a paginated list followed.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The largest answer read from the API (status line, headers, framing and
/// body): 64 MiB, far above a page of 500 Nodes. A larger answer is an
/// error, not a truncated document.
pub const MAX_ANSWER: usize = 64 << 20;
/// How many Nodes one page of the Node list asks for.
pub const NODE_PAGE: usize = 500;
/// Most pages one Node list may take (a server that keeps handing out
/// `continue` tokens cannot keep the caller forever).
const MAX_PAGES: usize = 2000;
/// How long one request may take, connection to last byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of an error body is quoted in an error message.
const QUOTE: usize = 300;

/// A Kubernetes API endpoint (`http://host:port`).
#[derive(Debug, Clone)]
pub struct KubeApi {
    host: String,
    port: u16,
    max_answer: usize,
}

impl KubeApi {
    pub fn new(url: &str) -> Result<KubeApi, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("Kubernetes API URL {url:?} must be http:// (e.g. kubectl proxy)")
        })?;
        let hostport = rest.trim_end_matches('/');
        if hostport.is_empty() || hostport.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!(
                "Kubernetes API URL {url:?} must be http://HOST[:PORT] with no path"
            ));
        }
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') => (
                h.to_string(),
                p.parse().map_err(|_| format!("bad port in {url:?}"))?,
            ),
            _ => (hostport.to_string(), 80),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err(format!("Kubernetes API URL {url:?} has no host"));
        }
        Ok(KubeApi {
            host,
            port,
            max_answer: MAX_ANSWER,
        })
    }

    /// The same endpoint with another answer size cap (tests).
    pub fn with_max_answer(mut self, bytes: usize) -> KubeApi {
        self.max_answer = bytes;
        self
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        let what = format!("{method} {path}");
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}:{}\r\nAccept: application/json\r\n\
             Accept-Encoding: identity\r\nConnection: close\r\n",
            self.port
        );
        if body.is_some() {
            req.push_str(&format!(
                "Content-Type: application/merge-patch+json\r\nContent-Length: {}\r\n",
                payload.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(&payload);
        let cap = self.max_answer;
        let exchange = async {
            let s = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
            let (rd, mut wr) = s.into_split();
            wr.write_all(req.as_bytes()).await?;
            // One byte past the cap tells "exactly the cap" from "more".
            let mut out = Vec::new();
            rd.take(cap as u64 + 1).read_to_end(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        };
        let raw = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("{what}: no complete answer within {REQUEST_TIMEOUT:?}"))?
            .map_err(|e| format!("{what}: {e}"))?;
        if raw.len() > cap {
            return Err(format!(
                "{what}: the answer is larger than {cap} bytes; refusing to read it"
            ));
        }
        let answer = parse_answer(&raw).map_err(|e| format!("{what}: {e}"))?;
        if !(200..300).contains(&answer.status) {
            return Err(format!(
                "{what}: HTTP {}: {}",
                answer.status,
                quote(&answer.body)
            ));
        }
        serde_json::from_slice(&answer.body).map_err(|e| {
            format!(
                "{what}: the answer is not JSON ({e}): {}",
                quote(&answer.body)
            )
        })
    }

    /// Names of the Nodes that exist. An error means "unknown": the list
    /// failed, was cut short, was not a `NodeList`, or a page of it was
    /// missing. It is never an empty or partial set.
    pub async fn node_names(&self) -> Result<BTreeSet<String>, String> {
        let mut names = BTreeSet::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut path = format!("/api/v1/nodes?limit={NODE_PAGE}");
            if let Some(t) = &token {
                path.push_str("&continue=");
                path.push_str(&percent_encode(t));
            }
            let v = self.request("GET", &path, None).await?;
            let next = node_page(&v, &mut names).map_err(|e| format!("GET {path}: {e}"))?;
            match next {
                None => return Ok(names),
                Some(t) if token.as_deref() == Some(t.as_str()) => {
                    return Err(format!(
                        "GET {path}: the server handed back the same continue token"
                    ))
                }
                Some(t) => token = Some(t),
            }
        }
        Err(format!(
            "GET /api/v1/nodes: still more pages after {MAX_PAGES} pages of {NODE_PAGE}"
        ))
    }

    /// Removes the taints whose key is in `keys` from `node`; returns
    /// whether it changed anything. The patch carries the Node's
    /// resourceVersion, so a taint added meanwhile is never dropped (the
    /// API answers 409 and the removal is tried again on the new Node).
    pub async fn remove_taints(&self, node: &str, keys: &[String]) -> Result<bool, String> {
        coil::store::model::validate_node_name(node).map_err(|e| e.to_string())?;
        let path = format!("/api/v1/nodes/{node}");
        let mut last = String::new();
        for _ in 0..5 {
            let n = self.request("GET", &path, None).await?;
            if n["kind"].as_str().is_some_and(|k| k != "Node") {
                return Err(format!(
                    "GET {path}: the answer is a {}, not a Node",
                    n["kind"]
                ));
            }
            let taints: Vec<Value> = match &n["spec"]["taints"] {
                Value::Null => Vec::new(),
                Value::Array(a) => a.clone(),
                other => {
                    return Err(format!(
                        "GET {path}: spec.taints is not a list: {}",
                        quote(other.to_string().as_bytes())
                    ))
                }
            };
            let kept: Vec<Value> = taints
                .iter()
                .filter(|t| !keys.iter().any(|k| t["key"].as_str() == Some(k.as_str())))
                .cloned()
                .collect();
            if kept.len() == taints.len() {
                return Ok(false);
            }
            let mut patch = json!({"spec": {"taints": kept}});
            if let Some(rv) = n["metadata"]["resourceVersion"].as_str() {
                patch["metadata"] = json!({ "resourceVersion": rv });
            }
            match self.request("PATCH", &path, Some(&patch)).await {
                Ok(_) => return Ok(true),
                Err(e) if e.contains("HTTP 409") => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(format!(
            "{last} (the Node kept changing; gave up after 5 tries)"
        ))
    }
}

/// Adds the names of one page of a Node list to `names`; returns its
/// `continue` token, if more pages follow.
fn node_page(v: &Value, names: &mut BTreeSet<String>) -> Result<Option<String>, String> {
    match v["kind"].as_str() {
        Some("NodeList") => {}
        Some(k) => return Err(format!("the answer is a {k}, not a NodeList")),
        None => return Err("the answer has no kind; expected a NodeList".into()),
    }
    let items = v["items"]
        .as_array()
        .ok_or("the NodeList has no items array")?;
    for (i, n) in items.iter().enumerate() {
        let name = n["metadata"]["name"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("item {i} of the NodeList has no metadata.name"))?;
        names.insert(name.to_string());
    }
    Ok(v["metadata"]["continue"]
        .as_str()
        .filter(|t| !t.is_empty())
        .map(String::from))
}

/// A parsed HTTP answer.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    body: Vec<u8>,
}

/// Parses a whole HTTP/1.x answer read until the server closed: status
/// line, headers, and a body framed by chunked encoding, `Content-Length`
/// or the end of the connection. A body shorter than its framing promises
/// is an error.
fn parse_answer(raw: &[u8]) -> Result<Answer, String> {
    if raw.is_empty() {
        return Err("the server closed the connection without answering".into());
    }
    let end = find(raw, b"\r\n\r\n").ok_or("the answer ends inside its headers")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "the answer's headers are not text")?;
    let rest = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or_default();
    let status = parts
        .next()
        .filter(|s| s.len() == 3)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..600).contains(s));
    let status = match (version.starts_with("HTTP/1."), status) {
        (true, Some(s)) => s,
        _ => {
            return Err(format!(
                "not an HTTP/1.x status line: {}",
                quote(status_line.as_bytes())
            ))
        }
    };
    let mut chunked = false;
    let mut length: Option<usize> = None;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("malformed header line: {}", quote(line.as_bytes())))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("chunked") {
                return Err(format!("unsupported Transfer-Encoding {value:?}"));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<usize>()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length headers".into());
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("content-encoding")
            && !value.eq_ignore_ascii_case("identity")
        {
            return Err(format!("unsupported Content-Encoding {value:?}"));
        }
    }
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        if rest.len() < n {
            return Err(format!(
                "the answer was cut short: {} of {n} bytes of body",
                rest.len()
            ));
        }
        rest[..n].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Answer { status, body })
}

/// Decodes an HTTP/1.1 chunked body, which must end with its last (empty)
/// chunk.
fn dechunk(mut s: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = find(s, b"\r\n").ok_or("the chunked body was cut short (no chunk size line)")?;
        let line = std::str::from_utf8(&s[..eol]).map_err(|_| "a chunk size is not text")?;
        // A chunk extension (";name=value") is allowed and ignored.
        let size = line.split(';').next().unwrap_or_default().trim();
        let n = usize::from_str_radix(size, 16)
            .ok()
            .filter(|_| !size.is_empty() && size.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| format!("bad chunk size {}", quote(line.as_bytes())))?;
        s = &s[eol + 2..];
        if n == 0 {
            // Trailers, if any, are ignored: the body is whole.
            return Ok(out);
        }
        if s.len() < n {
            return Err(format!(
                "the chunked body was cut short: a chunk of {n} bytes has {}",
                s.len()
            ));
        }
        out.extend_from_slice(&s[..n]);
        s = s[n..]
            .strip_prefix(b"\r\n")
            .ok_or("a chunk is not followed by CRLF")?;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// At most [`QUOTE`] bytes of `b`, as text, for an error message.
fn quote(b: &[u8]) -> String {
    let text = String::from_utf8_lossy(&b[..b.len().min(QUOTE)]);
    let more = if b.len() > QUOTE { "..." } else { "" };
    format!("{:?}{more}", text.trim())
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn urls_and_chunks() {
        assert!(KubeApi::new("https://x").is_err());
        assert!(KubeApi::new("http://").is_err());
        assert!(KubeApi::new("http://h:1/api").is_err());
        assert!(KubeApi::new("http://h:x").is_err());
        let k = KubeApi::new("http://127.0.0.1:8001").expect("url");
        assert_eq!(k.port, 8001);
        let k = KubeApi::new("http://[::1]:8001/").expect("url");
        assert_eq!((k.host.as_str(), k.port), ("::1", 8001));
        assert_eq!(
            dechunk(b"4\r\nabcd\r\n3;x=y\r\nefg\r\n0\r\n\r\n").expect("chunks"),
            b"abcdefg"
        );
        assert!(dechunk(b"4\r\nabcd\r\n").is_err(), "no last chunk");
        assert!(dechunk(b"9\r\nabcd").is_err(), "short chunk");
        assert!(dechunk(b"zz\r\nabcd\r\n0\r\n\r\n").is_err());
        assert!(dechunk(b"+4\r\nabcd\r\n0\r\n\r\n").is_err());
        assert!(dechunk(b"ffffffffffffffffffff\r\n").is_err(), "overflow");
        assert!(dechunk(b"2\r\nabcd\r\n0\r\n\r\n").is_err(), "no CRLF");
        assert_eq!(percent_encode("a b/c=="), "a%20b%2Fc%3D%3D");
    }

    #[test]
    fn answers_are_framed_or_refused() {
        let ok = parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").expect("ok");
        assert_eq!((ok.status, ok.body.as_slice()), (200, &b"{}"[..]));
        // Cut short: an error, never a shorter document.
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{}").is_err());
        assert!(
            parse_answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n")
                .is_err()
        );
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\nContent-Type: x").is_err());
        assert!(parse_answer(b"").is_err());
        assert!(parse_answer(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_answer(b"HTTP/1.1 2000 OK\r\n\r\n").is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\nbroken\r\n\r\n").is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n{}").is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n{}").is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\nX: \xff\r\n\r\n{}").is_err());
        // Error bodies are quoted, cut to a bounded length.
        assert!(quote(&[b'a'; 5000]).len() < QUOTE + 10);
        assert_eq!(quote("é".as_bytes()), "\"é\"");
    }

    #[test]
    fn node_pages_must_be_node_lists() {
        let mut names = BTreeSet::new();
        let page = json!({"kind": "NodeList", "items": [{"metadata": {"name": "a"}}],
                          "metadata": {"continue": "t1"}});
        assert_eq!(
            node_page(&page, &mut names).expect("page"),
            Some("t1".into())
        );
        assert!(names.contains("a"));
        for bad in [
            json!({"items": []}),
            json!({"kind": "PodList", "items": []}),
            json!({"kind": "NodeList"}),
            json!({"kind": "NodeList", "items": null}),
            json!({"kind": "NodeList", "items": [{"metadata": {}}]}),
            json!({"kind": "Status", "status": "Failure"}),
        ] {
            assert!(node_page(&bad, &mut BTreeSet::new()).is_err(), "{bad}");
        }
    }

    /// Serves each of `answers` (raw bytes, written in the given pieces,
    /// with a pause between them so they reach the client as separate
    /// reads) to one connection, in order; returns the API and the request
    /// lines seen.
    async fn fake(answers: Vec<Vec<Vec<u8>>>) -> (KubeApi, tokio::task::JoinHandle<Vec<String>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            for pieces in answers {
                let (mut c, _) = l.accept().await.expect("accept");
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while find(&req, b"\r\n\r\n").is_none() {
                    let n = c.read(&mut buf).await.expect("read");
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..n]);
                }
                let line = String::from_utf8_lossy(&req);
                seen.push(line.lines().next().unwrap_or_default().to_string());
                for p in pieces {
                    if c.write_all(&p).await.is_err() {
                        break;
                    }
                    let _ = c.flush().await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            seen
        });
        let api = KubeApi::new(&format!("http://127.0.0.1:{port}")).expect("api");
        (api, task)
    }

    fn chunk(b: &[u8]) -> Vec<u8> {
        let mut v = format!("{:x}\r\n", b.len()).into_bytes();
        v.extend_from_slice(b);
        v.extend_from_slice(b"\r\n");
        v
    }

    #[tokio::test]
    async fn a_multibyte_character_split_across_chunks_and_reads_is_whole() {
        let body = r#"{"kind":"NodeList","items":[{"metadata":{"name":"n1","labels":{"note":"日本語é"}}}]}"#;
        let bytes = body.as_bytes();
        // Cut inside 日 (3 bytes): the chunk boundary splits the character.
        let cut = body.find('日').expect("char") + 1;
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let (a, b) = bytes.split_at(cut);
        let (api, task) = fake(vec![vec![head, chunk(a), chunk(b), b"0\r\n\r\n".to_vec()]]).await;
        let names = api.node_names().await.expect("names");
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            vec!["n1".to_string()]
        );
        let seen = task.await.expect("server");
        assert_eq!(
            seen,
            vec!["GET /api/v1/nodes?limit=500 HTTP/1.1".to_string()]
        );
    }

    #[tokio::test]
    async fn an_oversized_answer_is_refused() {
        let body = format!(
            r#"{{"kind":"NodeList","items":[],"pad":"{}"}}"#,
            "x".repeat(8192)
        );
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (api, _task) = fake(vec![vec![answer.into_bytes()]]).await;
        let e = api
            .with_max_answer(4096)
            .node_names()
            .await
            .expect_err("too big");
        assert!(e.contains("larger than 4096 bytes"), "{e}");
    }

    #[tokio::test]
    async fn garbage_and_cut_answers_are_errors_not_panics() {
        let cases: Vec<Vec<u8>> = vec![
            b"\xff\xfe\x00garbage\r\n\r\n\xff".to_vec(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n{\"kind\":\"NodeList\",\"items\":[]".to_vec(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n{\"kind\":\"NodeList\",\"items\":[]}".to_vec(),
            b"HTTP/1.1 200 OK\r\n\r\n{\"kind\":\"NodeList\",\"items\":[{\"metadata\":{\"name\":\"\xe6\x97".to_vec(),
            b"HTTP/1.1 200 OK\r\n\r\n\xe6\x97\xa5".to_vec(),
            b"HTTP/1.1 500 Internal Server Error\r\n\r\n\xe6\x97 oops".to_vec(),
            b"HTTP/1.1 200 OK\r\n".to_vec(),
            Vec::new(),
        ];
        for raw in cases {
            let (api, _task) = fake(vec![vec![raw.clone()]]).await;
            let r = api.node_names().await;
            assert!(r.is_err(), "{:?} gave {r:?}", String::from_utf8_lossy(&raw));
        }
    }

    #[tokio::test]
    async fn every_page_is_followed_and_a_repeated_token_is_refused() {
        let page = |names: &[&str], cont: &str| {
            let items: Vec<Value> = names
                .iter()
                .map(|n| json!({"metadata": {"name": n}}))
                .collect();
            let b = json!({"kind": "NodeList", "items": items, "metadata": {"continue": cont}})
                .to_string();
            vec![format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{b}", b.len()).into_bytes()]
        };
        let (api, task) = fake(vec![page(&["a", "b"], "t/1="), page(&["c"], "")]).await;
        let names = api.node_names().await.expect("names");
        assert_eq!(names.len(), 3, "{names:?}");
        let seen = task.await.expect("server");
        assert_eq!(
            seen[1],
            "GET /api/v1/nodes?limit=500&continue=t%2F1%3D HTTP/1.1"
        );
        let (api, _task) = fake(vec![page(&["a"], "same"), page(&["b"], "same")]).await;
        let e = api.node_names().await.expect_err("loop");
        assert!(e.contains("same continue token"), "{e}");
        // A page that fails midway fails the whole list.
        let mut second = page(&[], "");
        second[0] = b"HTTP/1.1 410 Gone\r\nContent-Length: 7\r\n\r\nexpired".to_vec();
        let (api, _task) = fake(vec![page(&["a"], "t"), second]).await;
        let e = api.node_names().await.expect_err("gone");
        assert!(e.contains("HTTP 410") && e.contains("expired"), "{e}");
    }
}
