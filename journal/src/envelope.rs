//! The versioned envelope every stored value and every WAL frame sits in.
//!
//! ```text
//! offset  size  field
//!      0     4  magic  b"CJNL"
//!      4     2  format version (u16, little endian)
//!      6     1  record kind (see [`Kind`])
//!      7     1  flags (must be 0)
//!      8     4  payload length (u32, little endian)
//!     12     4  CRC32 (IEEE) over bytes 0..12 and the payload
//!     16     n  payload (bincode 2, standard config, of the persisted type)
//! ```
//!
//! Decoding never panics and never trusts a field before the checksum has
//! been verified; any mismatch is a [`DecodeError`] that callers wrap into a
//! `Corrupt { key, reason }` journal error naming the record.

use std::fmt;

/// The four magic bytes that open every envelope.
pub const MAGIC: [u8; 4] = *b"CJNL";
/// Size of the fixed envelope header.
pub const HEADER_LEN: usize = 16;
/// The on-disk format version this build writes. Format 2 changed the WAL
/// (segment salt and `synced_seq` in batch frames, see `wal.rs`) and the
/// attachment key (it carries the network name; attachment, intent and
/// address records decode format-1 payloads as keys without a network,
/// see `codec.rs`); every other record has the same payload in both.
pub const FORMAT_VERSION: u16 = 2;
/// The oldest on-disk format version this build reads.
pub const OLDEST_FORMAT_VERSION: u16 = 1;
/// Upper bound on a payload, so a corrupt length can never make us allocate
/// gigabytes. Real records are well under a kilobyte; WAL batches under a few.
pub const MAX_PAYLOAD: usize = 16 * 1024 * 1024;

/// What a record is. The kind is checked against the tree a value is read
/// from, so a value copied into the wrong place is reported, not misread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// The journal's format version marker (meta tree).
    Format = 1,
    /// Node identity and boot id (meta tree).
    NodeMeta = 2,
    /// A u64 counter such as the checkpoint sequence or intent high-water mark.
    Counter = 3,
    /// A block lease (leases tree).
    Lease = 4,
    /// A pod attachment (attachments tree).
    Attachment = 5,
    /// An intent (intents tree).
    Intent = 6,
    /// An address assignment (addresses tree).
    Address = 7,
    /// An opaque entry of the embedded cluster store (store tree).
    StoreEntry = 8,
    /// A batch of operations in the write-ahead log.
    WalBatch = 16,
    /// The header frame that opens every WAL segment.
    WalSegmentHeader = 17,
}

impl Kind {
    /// Maps the on-disk byte back to a kind.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Format,
            2 => Kind::NodeMeta,
            3 => Kind::Counter,
            4 => Kind::Lease,
            5 => Kind::Attachment,
            6 => Kind::Intent,
            7 => Kind::Address,
            8 => Kind::StoreEntry,
            16 => Kind::WalBatch,
            17 => Kind::WalSegmentHeader,
            _ => return None,
        })
    }
}

/// Why an envelope could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than a header, or fewer than the header's length says.
    Truncated { have: usize, need: usize },
    /// The first four bytes are not [`MAGIC`].
    BadMagic([u8; 4]),
    /// The stored checksum does not match the bytes.
    Checksum { stored: u32, computed: u32 },
    /// Bytes follow the payload the header announced.
    TrailingBytes(usize),
    /// The header's length is larger than [`MAX_PAYLOAD`].
    TooLarge(usize),
    /// Written by a newer coil.
    NewerVersion(u16),
    /// Older than anything this build can read.
    OlderVersion(u16),
    /// A kind byte this build does not know.
    UnknownKind(u8),
    /// The kind is valid but not the one expected at this place.
    WrongKind { expected: Kind, found: Kind },
    /// Flags set that no format defines.
    BadFlags(u8),
    /// The checksum matched but the payload does not decode as its type, or
    /// decodes to a value that violates the type's invariants.
    Payload(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated { have, need } => {
                write!(f, "truncated: {have} bytes, need {need}")
            }
            DecodeError::BadMagic(m) => write!(f, "bad magic {m:02x?}"),
            DecodeError::Checksum { stored, computed } => {
                write!(
                    f,
                    "checksum mismatch: stored {stored:08x}, computed {computed:08x}"
                )
            }
            DecodeError::TrailingBytes(n) => write!(f, "{n} trailing bytes after the payload"),
            DecodeError::TooLarge(n) => write!(f, "payload length {n} exceeds the limit"),
            DecodeError::NewerVersion(v) => write!(
                f,
                "format version {v} is newer than this coil supports ({FORMAT_VERSION})"
            ),
            DecodeError::OlderVersion(v) => write!(
                f,
                "format version {v} is older than this coil reads ({OLDEST_FORMAT_VERSION})"
            ),
            DecodeError::UnknownKind(k) => write!(f, "unknown record kind {k}"),
            DecodeError::WrongKind { expected, found } => {
                write!(f, "record kind {found:?} where {expected:?} was expected")
            }
            DecodeError::BadFlags(b) => write!(f, "undefined flags {b:#04x}"),
            DecodeError::Payload(e) => write!(f, "payload: {e}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// A decoded envelope header together with its verified payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub version: u16,
    pub kind: Kind,
    pub payload: &'a [u8],
}

fn crc(header12: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header12);
    h.update(payload);
    h.finalize()
}

/// Wraps `payload` in an envelope of `kind` at the current format version.
pub fn seal(kind: Kind, payload: &[u8]) -> Vec<u8> {
    seal_at(kind, FORMAT_VERSION, payload)
}

/// Wraps `payload` in an envelope of `kind` at `version` (tests write older
/// formats with it).
pub(crate) fn seal_at(kind: Kind, version: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.push(kind as u8);
    out.push(0);
    // Payloads are produced by this crate and bounded far below u32::MAX.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    let sum = crc(&out[..12], payload);
    out.extend_from_slice(&sum.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads only the header of the envelope at the start of `buf` and returns
/// the total length of the frame (header plus payload) it announces,
/// without verifying the checksum. Used to walk WAL segments.
pub fn frame_len(buf: &[u8]) -> Result<usize, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Err(DecodeError::Truncated {
            have: buf.len(),
            need: HEADER_LEN,
        });
    }
    let magic = [buf[0], buf[1], buf[2], buf[3]];
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    let len = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(DecodeError::TooLarge(len));
    }
    Ok(HEADER_LEN + len)
}

/// Decodes the envelope at the start of `buf`, which must hold exactly one
/// envelope. Checks, in order: length, magic, announced length, checksum,
/// flags, version, kind.
pub fn open(buf: &[u8]) -> Result<Envelope<'_>, DecodeError> {
    let total = frame_len(buf)?;
    if buf.len() < total {
        return Err(DecodeError::Truncated {
            have: buf.len(),
            need: total,
        });
    }
    if buf.len() > total {
        return Err(DecodeError::TrailingBytes(buf.len() - total));
    }
    let payload = &buf[HEADER_LEN..total];
    let stored = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
    let computed = crc(&buf[..12], payload);
    if stored != computed {
        return Err(DecodeError::Checksum { stored, computed });
    }
    if buf[7] != 0 {
        return Err(DecodeError::BadFlags(buf[7]));
    }
    let version = u16::from_le_bytes([buf[4], buf[5]]);
    if version > FORMAT_VERSION {
        return Err(DecodeError::NewerVersion(version));
    }
    if version < OLDEST_FORMAT_VERSION {
        return Err(DecodeError::OlderVersion(version));
    }
    let kind = Kind::from_u8(buf[6]).ok_or(DecodeError::UnknownKind(buf[6]))?;
    Ok(Envelope {
        version,
        kind,
        payload,
    })
}

/// Like [`open`], and also requires the record to be of `expected` kind.
pub fn open_kind(buf: &[u8], expected: Kind) -> Result<Envelope<'_>, DecodeError> {
    let env = open(buf)?;
    if env.kind != expected {
        return Err(DecodeError::WrongKind {
            expected,
            found: env.kind,
        });
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let sealed = seal(Kind::Attachment, b"hello");
        let env = open(&sealed).expect("valid envelope");
        assert_eq!(env.kind, Kind::Attachment);
        assert_eq!(env.version, FORMAT_VERSION);
        assert_eq!(env.payload, b"hello");
        assert_eq!(frame_len(&sealed), Ok(sealed.len()));
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let sealed = seal(Kind::Lease, b"some payload bytes");
        for i in 0..sealed.len() * 8 {
            let mut b = sealed.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(open(&b).is_err(), "flip of bit {i} went unnoticed");
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let sealed = seal(Kind::Intent, b"0123456789");
        for n in 0..sealed.len() {
            assert!(
                open(&sealed[..n]).is_err(),
                "truncation to {n} went unnoticed"
            );
        }
    }

    #[test]
    fn wrong_kind_and_versions() {
        let sealed = seal(Kind::Lease, b"x");
        assert_eq!(
            open_kind(&sealed, Kind::Attachment),
            Err(DecodeError::WrongKind {
                expected: Kind::Attachment,
                found: Kind::Lease
            })
        );
        // A newer version with a valid checksum is refused as newer, not corrupt.
        let mut newer = sealed.clone();
        newer[4..6].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let sum = crc(&newer[..12], &newer[16..]);
        newer[12..16].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(
            open(&newer),
            Err(DecodeError::NewerVersion(FORMAT_VERSION + 1))
        );
    }

    #[test]
    fn huge_length_is_refused_without_allocating() {
        let mut b = seal(Kind::WalBatch, b"");
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(open(&b), Err(DecodeError::TooLarge(_))));
    }
}
