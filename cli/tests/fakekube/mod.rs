//! An HTTPS fake of the few Kubernetes API paths coil uses, for tests:
//! there is no kube-apiserver where coil is developed or tested.
//!
//! - TLS with a throwaway CA and a server certificate for 127.0.0.1
//!   (rcgen); the kubeconfig it writes names the CA, so the client
//!   verifies the server as it would a real one.
//! - Every request must carry `Authorization: Bearer <token>`; otherwise
//!   401, as the real API answers.
//! - Nodes: a paged list (`limit`, `continue`), a watch that replays the
//!   events after the asked resourceVersion and then streams live ones,
//!   GET and merge PATCH of one Node with resourceVersion preconditions
//!   (409 on a stale one).
//! - events.k8s.io/v1 Events: POSTs are recorded.
//! - Faults: answer lists with an error status, drop every open watch,
//!   expire watches (410 Gone), answer lists with an oversized body, add
//!   a taint between a client's GET and PATCH.
//!
//! The server runs on a thread of its own with its own runtime (bound
//! inside a given netns when asked), so a test may be sync or async and
//! may run the programs under test as child processes.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

type Body = BoxBody<Bytes, Infallible>;

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub body: String,
    pub authorized: bool,
}

#[derive(Debug, Default)]
pub struct State {
    /// name -> (resourceVersion, taints)
    pub nodes: BTreeMap<String, (u64, Value)>,
    /// The resourceVersion counter.
    pub rv: u64,
    /// (rv, "ADDED" | "MODIFIED" | "DELETED", node name) in order.
    pub events: Vec<(u64, &'static str, String)>,
    /// Events older than this rv are compacted: a watch from before it
    /// gets 410 Gone.
    pub compacted: u64,
    /// Answer Node lists (not watches) with this status and body.
    pub list_failure: Option<(u16, String)>,
    /// Answer Node lists with a body this many bytes long.
    pub list_oversize: Option<usize>,
    /// Add this taint to the Node on the next PATCH before applying it.
    pub taint_before_patch: Option<Value>,
    pub seen: Vec<Seen>,
    /// Open watch streams.
    watchers: Vec<tokio::sync::mpsc::UnboundedSender<Bytes>>,
    pub posted_events: Vec<Value>,
}

impl State {
    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn node_meta(name: &str, rv: u64) -> Value {
        json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
               "metadata": {"name": name, "resourceVersion": rv.to_string(),
                            "uid": format!("uid-{name}")}})
    }

    fn node_full(name: &str, rv: u64, taints: &Value) -> Value {
        json!({"kind": "Node", "apiVersion": "v1",
               "metadata": {"name": name, "resourceVersion": rv.to_string(),
                            "uid": format!("uid-{name}")},
               "spec": {"taints": taints}})
    }

    fn event_line(&self, kind: &str, name: &str, rv: u64) -> Bytes {
        let v = json!({"type": kind, "object": State::node_meta(name, rv)});
        Bytes::from(format!("{v}\n"))
    }

    fn broadcast(&mut self, kind: &'static str, name: &str) {
        let rv = self.rv;
        self.events.push((rv, kind, name.to_string()));
        let line = self.event_line(kind, name, rv);
        self.watchers.retain(|w| w.send(line.clone()).is_ok());
    }

    pub fn add_node(&mut self, name: &str, taints: Value) {
        let rv = self.bump();
        let kind = if self.nodes.contains_key(name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.nodes.insert(name.to_string(), (rv, taints));
        self.broadcast(kind, name);
    }

    pub fn delete_node(&mut self, name: &str) {
        if self.nodes.remove(name).is_some() {
            self.bump();
            self.broadcast("DELETED", name);
        }
    }

    /// Ends every open watch stream, as an API server does on its
    /// timeout or a restart.
    pub fn drop_watches(&mut self) {
        self.watchers.clear();
    }

    /// Forgets the event history: a watch resumed from an older version
    /// gets 410 Gone and must list again.
    pub fn compact(&mut self) {
        self.compacted = self.rv;
        self.events.clear();
    }
}

pub struct FakeKube {
    pub port: u16,
    pub state: Arc<Mutex<State>>,
    pub token: String,
    dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeKube {
    /// Starts the fake on 127.0.0.1 (inside `/run/netns/<netns>` when
    /// given).
    pub fn start(netns: Option<&str>) -> FakeKube {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "coil test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
        let cert = params.signed_by(&key, &issuer).expect("cert");
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).expect("ca.pem");

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let token = format!("coil-test-{}", std::process::id());
        let state = Arc::new(Mutex::new(State::default()));
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let netns = netns.map(|n| format!("/run/netns/{n}"));
        let (s2, t2) = (state.clone(), token.clone());
        std::thread::spawn(move || {
            if let Some(p) = netns {
                use std::os::fd::AsRawFd;
                let f = std::fs::File::open(p).expect("netns");
                // SAFETY: plain syscall on a valid fd, on this thread only.
                assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                port_tx
                    .send(l.local_addr().expect("addr").port())
                    .expect("port");
                loop {
                    let conn = tokio::select! {
                        c = l.accept() => c,
                        _ = &mut stopped => break,
                    };
                    let Ok((tcp, _)) = conn else { continue };
                    let (acceptor, state, token) = (acceptor.clone(), s2.clone(), t2.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let svc = hyper::service::service_fn(move |req| {
                            let (state, token) = (state.clone(), token.clone());
                            async move { Ok::<_, Infallible>(handle(state, &token, req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                            .await;
                    });
                }
            });
        });
        let port = port_rx.recv().expect("fake API port");
        let f = FakeKube {
            port,
            state,
            token,
            dir,
            stop: Some(stop),
        };
        f.write_kubeconfig("kubeconfig", &f.token.clone());
        f
    }

    /// Writes a kubeconfig for this server with `token` under `name` in
    /// the fake's directory; returns its path.
    pub fn write_kubeconfig(&self, name: &str, token: &str) -> PathBuf {
        let ca = self.dir.path().join("ca.pem");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    \
             server: https://127.0.0.1:{}\n    certificate-authority: {}\nusers:\n- name: fake\n  \
             user:\n    token: {token}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    \
             user: fake\ncurrent-context: fake\n",
            self.port,
            ca.display()
        );
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("kubeconfig");
        p
    }

    /// The CA that signed the server's certificate (PEM).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The kubeconfig with the right token.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().expect("fake state"))
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.with(|s| s.seen.clone())
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.with(|s| s.drop_watches());
    }
}

fn json_answer(status: u16, v: &Value) -> Response<Body> {
    raw_answer(status, v.to_string())
}

fn raw_answer(status: u16, body: String) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(status).expect("status"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("response")
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_answer(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
    )
}

fn query(uri: &hyper::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%2F", "/")))
        .collect()
}

async fn handle(state: Arc<Mutex<State>>, token: &str, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().to_string();
    let uri = req.uri().clone();
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(format!("Bearer {token}").as_str());
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).to_string())
        .unwrap_or_default();
    let mut st = state.lock().expect("fake state");
    st.seen.push(Seen {
        method: method.clone(),
        uri: uri.to_string(),
        body: body.clone(),
        authorized,
    });
    if !authorized {
        return status(401, "Unauthorized", "Unauthorized");
    }
    let q = query(&uri);
    let path = uri.path().to_string();
    if path == "/api/v1/nodes" && method == "GET" {
        if q.get("watch").map(String::as_str) == Some("true")
            || q.get("watch").map(String::as_str) == Some("1")
        {
            return watch(&mut st, &q);
        }
        if let Some((code, body)) = st.list_failure.clone() {
            return raw_answer(code, body);
        }
        if let Some(n) = st.list_oversize {
            let pad = "x".repeat(n);
            return raw_answer(
                200,
                format!(
                    r#"{{"kind":"PartialObjectMetadataList","apiVersion":"meta.k8s.io/v1","metadata":{{"resourceVersion":"1","pad":"{pad}"}},"items":[]}}"#
                ),
            );
        }
        return list(&st, &q);
    }
    if let Some(name) = path.strip_prefix("/api/v1/nodes/") {
        let name = name.to_string();
        let Some((rv, taints)) = st.nodes.get(&name).cloned() else {
            return status(404, "NotFound", &format!("nodes \"{name}\" not found"));
        };
        if method == "GET" {
            return json_answer(200, &State::node_full(&name, rv, &taints));
        }
        if method == "PATCH" {
            // Someone else's write lands first: the patch below then
            // carries a stale resourceVersion and gets 409 from the
            // ordinary check, as from a real API server.
            let rv = match st.taint_before_patch.take() {
                Some(extra) => {
                    let mut t = taints.as_array().cloned().unwrap_or_default();
                    t.push(extra);
                    st.add_node(&name, Value::Array(t));
                    st.rv
                }
                None => rv,
            };
            let Ok(p) = serde_json::from_str::<Value>(&body) else {
                return status(400, "BadRequest", "not JSON");
            };
            if let Some(want) = p["metadata"]["resourceVersion"].as_str() {
                if want != rv.to_string() {
                    return status(409, "Conflict", "the object has been modified");
                }
            }
            let new_taints = p["spec"]["taints"].clone();
            st.add_node(&name, new_taints.clone());
            let rv = st.rv;
            return json_answer(200, &State::node_full(&name, rv, &new_taints));
        }
    }
    if path.starts_with("/apis/events.k8s.io/v1/namespaces/") && method == "POST" {
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        st.posted_events.push(v.clone());
        return json_answer(201, &v);
    }
    status(
        404,
        "NotFound",
        &format!("{method} {path} is not served by the fake"),
    )
}

fn list(st: &State, q: &BTreeMap<String, String>) -> Response<Body> {
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(usize::MAX);
    let from: usize = q
        .get("continue")
        .and_then(|c| c.strip_prefix("at/"))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let names: Vec<(&String, u64)> = st.nodes.iter().map(|(n, (rv, _))| (n, *rv)).collect();
    let page: Vec<Value> = names
        .iter()
        .skip(from)
        .take(limit)
        .map(|(n, rv)| State::node_meta(n, *rv))
        .collect();
    let next = from + page.len();
    let cont = if next < names.len() {
        format!("at/{next}")
    } else {
        String::new()
    };
    json_answer(
        200,
        &json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1",
                "metadata": {"resourceVersion": st.rv.to_string(), "continue": cont},
                "items": page}),
    )
}

fn watch(st: &mut State, q: &BTreeMap<String, String>) -> Response<Body> {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    if from < st.compacted {
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
            "status": "Failure", "reason": "Expired", "code": 410,
            "message": format!("too old resource version: {from} ({})", st.compacted)}});
        let _ = tx.send(Bytes::from(format!("{gone}\n")));
    } else {
        let backlog: Vec<Bytes> = st
            .events
            .iter()
            .filter(|(rv, _, _)| *rv > from)
            .map(|(rv, k, n)| st.event_line(k, n, *rv))
            .collect();
        for b in backlog {
            let _ = tx.send(b);
        }
        st.watchers.push(tx);
    }
    let stream = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|o| o.map(|b| Ok::<_, Infallible>(Frame::data(b))))
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("response")
}
