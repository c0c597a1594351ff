//! The etcd adapter: the only module that knows etcd-client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Identity,
    PutOptions, TlsOptions, TxnOp, TxnOpResponse,
};

use super::backend::{
    Backend, BackendError, BackendErrorKind, Cmp, CmpOp, KeyValue, Op, OpResult, Txn, TxnResult,
};

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Deadline of every request (and of connecting).
    pub timeout: Duration,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: Option<TlsPem>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            timeout: Duration::from_secs(2),
            username: None,
            password: None,
            tls: None,
        }
    }
}

/// PEM material for TLS: a CA to verify etcd, and optionally a client
/// certificate and key (read from files or given inline by the caller).
#[derive(Clone, Default)]
pub struct TlsPem {
    pub ca: Option<Vec<u8>>,
    pub cert: Option<Vec<u8>>,
    pub key: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPem")
            .field("ca", &self.ca.is_some())
            .field("cert", &self.cert.is_some())
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A store backend on a real etcd cluster. Cheap to clone; clones share
/// the connection and the request counter.
#[derive(Clone)]
pub struct EtcdBackend {
    client: Client,
    endpoints: String,
    timeout: Duration,
    requests: Arc<AtomicU64>,
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("endpoints", &self.endpoints)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl EtcdBackend {
    /// Connects to etcd. Fails, naming the endpoints, if none answers
    /// within the timeout.
    pub async fn connect(opts: &EtcdOptions) -> Result<EtcdBackend, BackendError> {
        let endpoints = opts.endpoints.join(",");
        let fail = |kind, message: String| BackendError {
            kind,
            op: "connect".into(),
            key: "-".into(),
            endpoint: endpoints.clone(),
            message,
        };
        if opts.endpoints.is_empty() {
            return Err(fail(
                BackendErrorKind::Rejected,
                "no etcd endpoints configured".into(),
            ));
        }
        let mut co = ConnectOptions::new()
            .with_timeout(opts.timeout)
            .with_connect_timeout(opts.timeout)
            .with_keep_alive(Duration::from_secs(10), opts.timeout);
        if let (Some(u), Some(p)) = (&opts.username, &opts.password) {
            co = co.with_user(u.clone(), p.clone());
        }
        if let Some(t) = &opts.tls {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &t.ca {
                tls = tls.ca_certificate(Certificate::from_pem(ca.clone()));
            }
            match (&t.cert, &t.key) {
                (Some(c), Some(k)) => tls = tls.identity(Identity::from_pem(c.clone(), k.clone())),
                (None, None) => {}
                _ => {
                    return Err(fail(
                        BackendErrorKind::Rejected,
                        "a TLS client certificate needs both a certificate and a key".into(),
                    ))
                }
            }
            co = co.with_tls(tls);
        }
        let connect = Client::connect(opts.endpoints.clone(), Some(co));
        let client = match tokio::time::timeout(opts.timeout, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(fail(classify(&e), describe(&e))),
            Err(_) => {
                return Err(fail(
                    BackendErrorKind::Unavailable,
                    format!("no answer within {:?}", opts.timeout),
                ))
            }
        };
        Ok(EtcdBackend {
            client,
            endpoints,
            timeout: opts.timeout,
            requests: Arc::new(AtomicU64::new(0)),
        })
    }

    fn err(&self, op: &str, key: &str, e: etcd_client::Error) -> BackendError {
        BackendError {
            kind: classify(&e),
            op: op.to_string(),
            key: key.to_string(),
            endpoint: self.endpoints.clone(),
            message: describe(&e),
        }
    }

    fn timeout_err(&self, op: &str, key: &str) -> BackendError {
        BackendError {
            kind: BackendErrorKind::Unavailable,
            op: op.to_string(),
            key: key.to_string(),
            endpoint: self.endpoints.clone(),
            message: format!("no answer within {:?}", self.timeout),
        }
    }

    async fn call<T, F>(&self, op: &str, key: &str, f: F) -> Result<T, BackendError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.requests.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.err(op, key, e)),
            Err(_) => Err(self.timeout_err(op, key)),
        }
    }
}

/// A one-line description: the gRPC status and the innermost cause (for
/// example "connection refused"), without tonic's debug dumps.
fn describe(e: &etcd_client::Error) -> String {
    let mut root: Option<String> = None;
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        root = Some(s.to_string());
        src = s.source();
    }
    let head = match e {
        etcd_client::Error::GRpcStatus(s) => {
            let m = s.message();
            if m.is_empty() {
                format!("{:?}", s.code())
            } else {
                format!("{:?}: {m}", s.code())
            }
        }
        other => other.to_string(),
    };
    match root {
        Some(r) if !head.contains(&r) => format!("{head}: {r}"),
        _ => head,
    }
}

fn classify(e: &etcd_client::Error) -> BackendErrorKind {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => match s.code() {
            tonic_code::Unavailable
            | tonic_code::DeadlineExceeded
            | tonic_code::Aborted
            | tonic_code::ResourceExhausted
            | tonic_code::Unknown
            | tonic_code::Cancelled => BackendErrorKind::Unavailable,
            _ => BackendErrorKind::Rejected,
        },
        E::TransportError(_) | E::IoError(_) => BackendErrorKind::Unavailable,
        _ => BackendErrorKind::Rejected,
    }
}

/// tonic's status codes (etcd-client does not re-export them).
use tonic::Code as tonic_code;

fn cmp_op(op: CmpOp) -> CompareOp {
    match op {
        CmpOp::Equal => CompareOp::Equal,
        CmpOp::NotEqual => CompareOp::NotEqual,
        CmpOp::Less => CompareOp::Less,
        CmpOp::Greater => CompareOp::Greater,
    }
}

fn to_compare(c: Cmp) -> Compare {
    match c {
        Cmp::CreateRevision { key, op, rev } => Compare::create_revision(key, cmp_op(op), rev),
        Cmp::ModRevision { key, op, rev } => Compare::mod_revision(key, cmp_op(op), rev),
        Cmp::ValueEquals { key, value } => Compare::value(key, CompareOp::Equal, value),
        Cmp::RangeUnchangedBefore { start, end, rev } => {
            Compare::mod_revision(start, CompareOp::Less, rev).with_range(end)
        }
    }
}

fn to_op(o: Op) -> TxnOp {
    match o {
        Op::Put { key, value, lease } => {
            let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
            TxnOp::put(key, value, opts)
        }
        Op::Delete { key } => TxnOp::delete(key, None),
        Op::DeleteRange { start, end } => {
            TxnOp::delete(start, Some(DeleteOptions::new().with_range(end)))
        }
        Op::Range {
            start,
            end,
            limit,
            keys_only,
        } => {
            let mut g = GetOptions::new();
            if !end.is_empty() {
                g = g.with_range(end);
            }
            if limit > 0 {
                g = g.with_limit(limit);
            }
            if keys_only {
                g = g.with_keys_only();
            }
            TxnOp::get(start, Some(g))
        }
    }
}

fn from_kv(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

fn first_key(t: &Txn) -> String {
    let k = t
        .then
        .iter()
        .chain(t.otherwise.iter())
        .map(|o| match o {
            Op::Put { key, .. } | Op::Delete { key } => key,
            Op::DeleteRange { start, .. } | Op::Range { start, .. } => start,
        })
        .next();
    k.map(|k| String::from_utf8_lossy(k).into_owned())
        .unwrap_or_else(|| "-".into())
}

impl Backend for EtcdBackend {
    async fn txn(&self, op: &str, txn: Txn) -> Result<TxnResult, BackendError> {
        let key = first_key(&txn);
        let t = etcd_client::Txn::new()
            .when(txn.when.into_iter().map(to_compare).collect::<Vec<_>>())
            .and_then(txn.then.into_iter().map(to_op).collect::<Vec<_>>())
            .or_else(txn.otherwise.into_iter().map(to_op).collect::<Vec<_>>());
        let mut kv = self.client.kv_client();
        let resp = self.call(op, &key, kv.txn(t)).await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let results = resp
            .op_responses()
            .into_iter()
            .map(|r| match r {
                TxnOpResponse::Put(_) => OpResult::Put,
                TxnOpResponse::Delete(d) => OpResult::Deleted(d.deleted().max(0) as u64),
                TxnOpResponse::Get(g) => OpResult::Range(g.kvs().iter().map(from_kv).collect()),
                TxnOpResponse::Txn(_) => OpResult::Put,
            })
            .collect();
        Ok(TxnResult {
            succeeded: resp.succeeded(),
            revision,
            results,
        })
    }

    async fn lease_grant(&self, ttl_secs: i64) -> Result<i64, BackendError> {
        let mut c = self.client.lease_client();
        let r = self
            .call("grant lease", "-", c.grant(ttl_secs, None))
            .await?;
        Ok(r.id())
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<i64, BackendError> {
        let mut c = self.client.lease_client();
        let key = format!("lease {id:x}");
        let res: Result<i64, BackendError> = async {
            let (mut keeper, mut stream) = self
                .call("keep lease alive", &key, c.keep_alive(id))
                .await?;
            self.call("keep lease alive", &key, keeper.keep_alive())
                .await?;
            match self
                .call("keep lease alive", &key, stream.message())
                .await?
            {
                Some(r) => Ok(r.ttl()),
                None => Ok(0),
            }
        }
        .await;
        match res {
            // etcd answers an expired lease with "lease not found".
            Err(e) if e.message.contains("lease not found") => Ok(0),
            other => other,
        }
    }

    async fn lease_revoke(&self, id: i64) -> Result<(), BackendError> {
        let mut c = self.client.lease_client();
        match self
            .call("revoke lease", &format!("lease {id:x}"), c.revoke(id))
            .await
        {
            Ok(_) => Ok(()),
            // An expired or unknown lease is already gone.
            Err(e) if e.message.contains("requested lease not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn describe(&self) -> String {
        format!("etcd {}", self.endpoints)
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}
