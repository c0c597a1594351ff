//! coil-journal: the node's crash-safe write-ahead journal.
//!
//! Every fact a node must not forget (its block leases, its pod attachments,
//! the addresses they hold, and the intents announcing effects on etcd and
//! the kernel) is committed here before anything acts on it.
//!
//! * **Durable means durable.** [`Journal::commit`] returns only after the
//!   batch's WAL frame has been `fdatasync`ed. Concurrent committers share one
//!   sync (group commit). sled holds the materialized state and is made
//!   durable by checkpoints that `fsync` its files, never by its own `flush`
//!   alone (sled issue #1452). See docs/journal.md.
//! * **Nothing is misread.** Every stored value and every WAL frame sits in a
//!   versioned, checksummed [`envelope`]; a value that fails the check is a
//!   [`JournalError::Corrupt`] naming its key, never a panic or a wrong value.
//! * **Persisted types are not domain types.** [`model`] is the public
//!   vocabulary; `codec` owns the on-disk structs and validates on decode.
//!
//! Only this crate knows sled and bincode.

pub mod envelope;
pub mod model;

mod codec;
mod durable;
mod error;
mod journal;
mod wal;

pub use codec::{valid_network_name, MAX_CONTAINER_ID, MAX_NETWORK_NAME};
pub use error::{JournalError, Result};
pub use journal::{
    now_unix, Batch, CommitInfo, CorruptRecord, Dump, Journal, JournalOptions, JournalStats,
    OpenReport, RecoveryMode, TornTail, VerifyReport, FAIL_SYNC_AFTER_ENV,
};
pub use model::*;

/// The sled trees the journal keeps, one per record kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tree {
    Meta,
    Leases,
    Attachments,
    Intents,
    Addresses,
    /// The embedded cluster store's key/value pairs (opaque to the
    /// journal; see coil's `store::embedded`).
    Store,
}

impl Tree {
    /// Every tree, in id order.
    pub const ALL: [Tree; 6] = [
        Tree::Meta,
        Tree::Leases,
        Tree::Attachments,
        Tree::Intents,
        Tree::Addresses,
        Tree::Store,
    ];

    /// The tree's id in WAL frames.
    pub fn id(self) -> u8 {
        self.index() as u8 + 1
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Tree::Meta => 0,
            Tree::Leases => 1,
            Tree::Attachments => 2,
            Tree::Intents => 3,
            Tree::Addresses => 4,
            Tree::Store => 5,
        }
    }

    pub(crate) fn from_id(id: u8) -> Option<Tree> {
        Tree::ALL.get(usize::from(id).checked_sub(1)?).copied()
    }

    /// The tree's name (also its sled tree name).
    pub fn name(self) -> &'static str {
        match self {
            Tree::Meta => "meta",
            Tree::Leases => "leases",
            Tree::Attachments => "attachments",
            Tree::Intents => "intents",
            Tree::Addresses => "addresses",
            Tree::Store => "store",
        }
    }
}

/// Decodes `bytes` as an envelope and then as the record its kind names,
/// the way the journal would read it. For fuzzing and tests: it must never
/// panic, whatever the input.
#[doc(hidden)]
pub fn decode_any(bytes: &[u8]) -> std::result::Result<envelope::Kind, envelope::DecodeError> {
    // WAL frames have a layout per format version, which `wal` knows.
    match envelope::open(bytes)?.kind {
        envelope::Kind::WalBatch => wal::decode_batch(bytes).map(|_| envelope::Kind::WalBatch),
        envelope::Kind::WalSegmentHeader => {
            wal::decode_header(bytes).map(|_| envelope::Kind::WalSegmentHeader)
        }
        _ => codec::decode_any(bytes),
    }
}

/// Seals `payload` as the record kind picked by `kind` (with a valid
/// checksum) and decodes it, so fuzzers reach the payload decoders.
#[doc(hidden)]
pub fn decode_sealed(
    kind: u8,
    payload: &[u8],
) -> std::result::Result<envelope::Kind, envelope::DecodeError> {
    codec::decode_sealed(kind, payload)
}
