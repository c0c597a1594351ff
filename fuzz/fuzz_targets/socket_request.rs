#![no_main]
//! Whatever arrives on coild's socket, decoding never panics, and what
//! decodes re-encodes to something that decodes to the same request.

use coil::api::SocketRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = SocketRequest::decode(data) {
        let again = serde_json::to_vec(&req).expect("encode");
        let back = SocketRequest::decode(&again).expect("re-decode");
        assert_eq!(
            serde_json::to_value(&back).expect("value"),
            serde_json::to_value(&req).expect("value")
        );
    }
});
