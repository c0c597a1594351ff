//! The journal's error type. Every variant names what failed and where, and
//! the ones an operator can act on say how.

use std::io;
use std::path::PathBuf;

/// An error from the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The store could not be opened (sled refused it, or it panicked on
    /// damaged files).
    #[error("journal {dir}: cannot open: {reason}; if the journal is damaged, rebuild it with `coilctl node repair --rebuild`")]
    Open { dir: PathBuf, reason: String },

    /// A read-only open found no journal in the directory.
    #[error("journal {dir}: no journal here")]
    NotFound { dir: PathBuf },

    /// Another process holds the journal's lock.
    #[error("journal {dir}: locked by another process (is coild running? stop it, or ask it through its socket)")]
    Locked { dir: PathBuf },

    /// Written by a newer coil; never misread.
    #[error("journal {dir}: format version {found} is newer than this coil supports ({supported}); run a newer coil")]
    NewerFormat {
        dir: PathBuf,
        found: u32,
        supported: u32,
    },

    /// Older than anything this build migrates.
    #[error("journal {dir}: format version {found} is older than this coil reads ({oldest}); rebuild it with `coilctl node repair --rebuild`")]
    OlderFormat {
        dir: PathBuf,
        found: u32,
        oldest: u32,
    },

    /// A record failed its envelope check or its type's invariants.
    #[error("corrupt journal record {key}: {reason}")]
    Corrupt { key: String, reason: String },

    /// A damaged WAL frame that is not a torn write: an intact frame written
    /// after it records that seqs up to `synced_seq` (which include `seq`,
    /// the first seq at or after the damage) had been fdatasynced, and so
    /// acknowledged, before it was written. Cutting the damage off would
    /// silently drop acknowledged commits, so opening refuses and changes
    /// nothing on disk.
    #[error(
        "journal WAL {segment}: damaged frame at byte {offset} (seq {seq}): {reason}; \
         the intact frame seq {proof_seq} at byte {proof_offset} was written after seqs up \
         to {synced_seq} were synced, so the damage holds acknowledged commits and is not \
         cut off; restore the journal from a copy, or rebuild it with \
         `coilctl node repair --rebuild`",
        segment = segment.display()
    )]
    AcknowledgedDamage {
        segment: PathBuf,
        /// Byte offset of the damaged frame in the segment.
        offset: u64,
        /// The first seq at or after the damage.
        seq: u64,
        reason: String,
        /// The intact later frame that proves the acknowledgement.
        proof_seq: u64,
        proof_offset: u64,
        /// What that frame records as synced when it was written (>= `seq`).
        synced_seq: u64,
    },

    /// An I/O call failed.
    #[error("journal I/O: {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// sled reported an error.
    #[error("journal store: {op}: {source}")]
    Sled {
        op: &'static str,
        #[source]
        source: sled::Error,
    },

    /// A write or a durability barrier failed earlier. The journal refuses
    /// further commits, because after a failed fsync the kernel may have
    /// dropped dirty pages: only a reopen knows what is durable.
    #[error("journal is poisoned after a failed write or sync ({reason}); restart coild so it reopens from what is durable")]
    Poisoned { reason: String },

    /// A commit on a journal opened read-only.
    #[error("journal {dir}: opened read-only")]
    ReadOnly { dir: PathBuf },

    /// The caller passed a record the journal refuses to store.
    #[error("invalid journal record: {0}")]
    Invalid(String),
}

impl JournalError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        JournalError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn sled(op: &'static str, source: sled::Error) -> Self {
        JournalError::Sled { op, source }
    }

    /// True when the journal itself is damaged (as opposed to busy, newer, or
    /// an I/O error that may pass): the cue for `coilctl node repair --rebuild`.
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            JournalError::Corrupt { .. }
                | JournalError::AcknowledgedDamage { .. }
                | JournalError::Open { .. }
        )
    }
}

/// Result alias for journal operations.
pub type Result<T, E = JournalError> = std::result::Result<T, E>;
