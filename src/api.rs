//! coild's socket protocol: one closed request type, shared by the `coil`
//! plugin, coilctl and coild.
//!
//! One connection carries one JSON request and one JSON answer. Anything
//! that does not decode as a [`SocketRequest`] is refused with a CNI
//! decode error; there is no other shape coild acts on.
//!
//! | request | who sends it | answer |
//! |---|---|---|
//! | `{"cni": Request}` | the plugin | [`crate::cni::Response`] |
//! | `{"repair": {"apply": bool}}` | `coilctl node repair` | [`RepairAnswer`] (dry run unless `apply` is true) |
//! | `{"stats": {}}` | operators, benchmarks | counters (JSON object) |
//! | `{"health": {}}` | the liveness probe (`coilctl node health`) | [`Health`] |
//! | `{"store": StoreRpc}` | coilctl, embedded store only | [`crate::store::rpc::StoreReply`] |
//!
//! Store calls are served only when coild runs the embedded store, and only
//! for keys under coil's prefix: with etcd, coilctl talks to etcd itself,
//! and the socket is never a proxy into the cluster store.

use serde::{Deserialize, Serialize};

use crate::cni::Request;
use crate::store::rpc::StoreRpc;

/// Largest request coild reads (the network configuration is at most
/// [`crate::cni::MAX_STDIN`]; a request wraps it in a little more).
pub const MAX_REQUEST: usize = crate::cni::MAX_STDIN + (64 << 10);
/// Largest answer a client reads.
pub const MAX_ANSWER: usize = 16 << 20;

/// Everything coild's socket understands.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SocketRequest {
    /// A CNI command, validated by the plugin (and again by coild).
    Cni(Request),
    /// Run recovery now. Without `apply` it only reports what it would do.
    Repair {
        #[serde(default)]
        apply: bool,
    },
    /// coild's counters.
    Stats {},
    /// Is coild able to serve (journal writable, startup done)?
    Health {},
    /// One call on the embedded cluster store.
    Store(StoreRpc),
}

impl SocketRequest {
    /// Decodes a request, with a short reason when it is not one.
    pub fn decode(bytes: &[u8]) -> Result<SocketRequest, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }

    /// A name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SocketRequest::Cni(_) => "cni",
            SocketRequest::Repair { .. } => "repair",
            SocketRequest::Stats {} => "stats",
            SocketRequest::Health {} => "health",
            SocketRequest::Store(_) => "store",
        }
    }
}

/// The answer to `{"health":{}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub node: String,
    /// coild can take requests: its journal accepts commits.
    pub healthy: bool,
    /// "ok", or why the journal refuses commits.
    pub journal: String,
    /// The last store call succeeded.
    pub store_reachable: bool,
    /// Free addresses in the node's leased blocks.
    pub free_addresses: u64,
}

/// The answer to `{"repair":{...}}`: the node and the steps, or an error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepairAnswer {
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub applied: bool,
    #[serde(default)]
    pub steps: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_type_is_closed() {
        assert!(matches!(
            SocketRequest::decode(br#"{"stats":{}}"#),
            Ok(SocketRequest::Stats {})
        ));
        assert!(matches!(
            SocketRequest::decode(br#"{"health":{}}"#),
            Ok(SocketRequest::Health {})
        ));
        // Repair is a dry run unless apply is said.
        assert!(matches!(
            SocketRequest::decode(br#"{"repair":{}}"#),
            Ok(SocketRequest::Repair { apply: false })
        ));
        assert!(matches!(
            SocketRequest::decode(br#"{"repair":{"apply":true}}"#),
            Ok(SocketRequest::Repair { apply: true })
        ));
        // The old field, unknown fields, unknown requests, two requests in
        // one object, trailing garbage: all refused.
        for bad in [
            &br#"{"repair":{"dry_run":false}}"#[..],
            br#"{"stats":{"x":1}}"#,
            br#"{"shell":"rm -rf /"}"#,
            br#"{"stats":{},"health":{}}"#,
            br#"{"stats":{}} {}"#,
            br#"[]"#,
            b"",
            br#"{"store":{"txn":{"op":"x"}}}"#,
        ] {
            assert!(
                SocketRequest::decode(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// The fuzz target's property on stable Rust: seeded mutations of
    /// valid requests (bit flips, truncations, splices) never panic the
    /// decoder, and whatever decodes round-trips.
    #[test]
    fn mutated_requests_never_panic() {
        let seeds: [&[u8]; 5] = [
            br#"{"stats":{}}"#,
            br#"{"repair":{"apply":true}}"#,
            br#"{"store":{"txn":{"op":"x","txn":{"when":[],"then":[{"Delete":{"key":[47,99]}}],"otherwise":[]}}}}"#,
            br#"{"cni":{"command":"ADD","container_id":"a","netns":"/run/netns/p","ifname":"eth0","pod":{"namespace":null,"name":null},"conf":{"cni_version":"1.0.0","name":"k8s","socket":null,"prev_result":null,"valid_attachments":null}}}"#,
            br#"{"health":{}}"#,
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut decoded = 0;
        for round in 0..20_000u32 {
            let seed = seeds[round as usize % seeds.len()];
            let mut b = seed.to_vec();
            match next() % 4 {
                0 => {
                    let i = (next() as usize) % b.len();
                    b[i] ^= 1 << (next() % 8);
                }
                1 => b.truncate((next() as usize) % b.len()),
                2 => {
                    let other = seeds[(next() as usize) % seeds.len()];
                    let at = (next() as usize) % b.len();
                    b.splice(at..at, other.iter().copied());
                }
                _ => {
                    let i = (next() as usize) % b.len();
                    b[i] = (next() % 256) as u8;
                }
            }
            if let Ok(req) = SocketRequest::decode(&b) {
                decoded += 1;
                let again = serde_json::to_vec(&req).expect("encode");
                assert!(SocketRequest::decode(&again).is_ok());
            }
        }
        // The sweep reaches valid requests too, not only garbage.
        assert!(decoded > 0);
    }

    #[test]
    fn cni_requests_round_trip() {
        let env = |k: &str| {
            Some(
                match k {
                    "CNI_COMMAND" => "ADD",
                    "CNI_CONTAINERID" => "abc",
                    "CNI_NETNS" => "/run/netns/p",
                    "CNI_IFNAME" => "eth0",
                    _ => return None,
                }
                .to_string(),
            )
        };
        let req = crate::cni::parse_request(env, br#"{"cniVersion":"1.0.0","name":"k8s"}"#)
            .expect("request");
        let bytes = serde_json::to_vec(&SocketRequest::Cni(req.clone())).expect("encode");
        match SocketRequest::decode(&bytes) {
            Ok(SocketRequest::Cni(r)) => assert_eq!(r, req),
            other => panic!("{other:?}"),
        }
    }
}
