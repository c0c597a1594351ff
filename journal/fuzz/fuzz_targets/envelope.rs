//! Fuzzes the envelope decoder and every record decoder behind it.
//! Run: `cd journal/fuzz && cargo fuzz run envelope` (needs cargo-fuzz and a
//! nightly compiler, or RUSTC_BOOTSTRAP=1).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As stored: the checksum guards everything behind it.
    let _ = coil_journal::decode_any(data);
    // Behind a valid checksum: the payload decoders see arbitrary bytes.
    if let Some((kind, payload)) = data.split_first() {
        let _ = coil_journal::decode_sealed(*kind, payload);
    }
});
