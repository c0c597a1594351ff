//! Write-ahead log segments.
//!
//! The WAL is a directory of segment files named `<first-seq, 20 digits>.wal`.
//! Each segment starts with a segment-header frame and continues with batch
//! frames, each a sealed envelope (see [`crate::envelope`]) whose payload
//! holds the batch's sequence number and its operations. Sequence numbers
//! increase by exactly one from frame to frame and across segments.
//!
//! A segment is only ever appended to, and only the newest segment can end in
//! a torn frame (older segments were fully synced before the next one was
//! created).
//!
//! Format 2 (this build writes it; format 1 segments are still read):
//!
//! * the segment header also carries a random **salt**, and every batch
//!   frame repeats it, so a frame found by scanning past damage is known to
//!   be one of this segment's frames and not bytes that merely look like
//!   one (an opaque store value can hold a sealed batch envelope);
//! * every batch frame carries **`synced_seq`**: the highest sequence number
//!   whose frame had been fdatasynced (and so acknowledged, or about to be)
//!   when this frame was written. An intact frame after a damaged one whose
//!   `synced_seq` reaches the damaged seq proves the damage is not a torn
//!   write: it held acknowledged commits.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::codec::{self, SegmentHeaderV1, WalBatchV1, WalOpV1};
use crate::durable;
use crate::envelope::{self, DecodeError, Kind, FORMAT_VERSION, MAGIC};
use crate::error::{JournalError, Result};

/// The first format whose segment headers and batch frames carry the
/// segment salt and the synced seq.
pub(crate) const SYNCED_SEQ_FORMAT: u16 = 2;

/// The segment header of format 2.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentHeaderV2 {
    pub format_version: u32,
    pub first_seq: u64,
    pub salt: u64,
}

/// A batch frame of format 2.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct WalBatchV2 {
    seq: u64,
    salt: u64,
    synced_seq: u64,
    ops: Vec<WalOpV1>,
}

/// A segment header as read, whatever its format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub format_version: u32,
    pub first_seq: u64,
    /// `None` in format 1.
    pub salt: Option<u64>,
}

/// A batch frame as read, whatever its format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WalBatch {
    pub seq: u64,
    /// `None` in format 1.
    pub salt: Option<u64>,
    /// Highest seq known synced when this frame was written; `None` in
    /// format 1.
    pub synced_seq: Option<u64>,
    pub ops: Vec<WalOpV1>,
}

/// A segment file on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Segment {
    pub first_seq: u64,
    pub path: PathBuf,
}

pub(crate) fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.wal"))
}

/// Lists the segments in `dir`, oldest first. Files that are not segments
/// are ignored.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<Segment>> {
    let mut out = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| JournalError::io("read dir", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| JournalError::io("read dir", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".wal") else {
            continue;
        };
        if stem.len() != 20 {
            continue;
        }
        let Ok(first_seq) = stem.parse::<u64>() else {
            continue;
        };
        out.push(Segment {
            first_seq,
            path: entry.path(),
        });
    }
    out.sort_by_key(|s| s.first_seq);
    Ok(out)
}

/// A segment just created: its file, its length (the header's), and the
/// salt every batch frame appended to it must carry.
#[derive(Debug)]
pub(crate) struct NewSegment {
    pub file: File,
    pub len: u64,
    pub salt: u64,
}

/// Creates a new segment whose first batch will carry `first_seq`: the file
/// is created, its header written and synced, and the directory synced,
/// before anything is appended to it.
pub(crate) fn create_segment(dir: &Path, first_seq: u64) -> Result<NewSegment> {
    let path = segment_path(dir, first_seq);
    let file = durable::create_private_file(&path, "create segment")?;
    let salt = new_salt();
    let header = codec::encode(
        Kind::WalSegmentHeader,
        &SegmentHeaderV2 {
            format_version: u32::from(FORMAT_VERSION),
            first_seq,
            salt,
        },
    );
    write_all_at(&file, &header, 0)
        .map_err(|e| JournalError::io("write segment header", &path, e))?;
    file.sync_all()
        .map_err(|e| JournalError::io("fsync segment", &path, e))?;
    durable::sync_dir(dir)?;
    Ok(NewSegment {
        file,
        len: header.len() as u64,
        salt,
    })
}

/// 64 random bits for a segment salt. The salt only has to be unknowable to
/// whoever chooses the bytes of stored values; it is not a key.
fn new_salt() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into a buffer we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if usize::try_from(n).ok() == Some(b.len()) {
        return u64::from_le_bytes(b);
    }
    // No getrandom (very old kernel, seccomp): std's hasher keys are seeded
    // from the OS once per process; mix in the time and pid.
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(now);
    h.write_u32(std::process::id());
    h.finish()
}

/// Writes all of `buf` at `offset`.
pub(crate) fn write_all_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(buf, offset)
}

/// Encodes one batch frame (format 2) for the segment with `salt`, written
/// when every seq up to `synced_seq` (< `seq`) is known durable.
pub(crate) fn encode_batch(seq: u64, salt: u64, synced_seq: u64, ops: &[WalOpV1]) -> Vec<u8> {
    // Cloning the ops into the persisted struct would cost an allocation per
    // op; serialize a borrowed view with the same layout instead.
    #[derive(serde::Serialize)]
    struct View<'a> {
        seq: u64,
        salt: u64,
        synced_seq: u64,
        ops: &'a [WalOpV1],
    }
    codec::encode(
        Kind::WalBatch,
        &View {
            seq,
            salt,
            synced_seq,
            ops,
        },
    )
}

/// The format version in an envelope's header, before it is verified: the
/// decoder that follows checks the checksum over it.
fn peek_version(frame: &[u8]) -> u16 {
    match frame.get(4..6) {
        Some(v) => u16::from_le_bytes([v[0], v[1]]),
        None => 0,
    }
}

/// Decodes a batch frame of either format.
pub(crate) fn decode_batch(frame: &[u8]) -> Result<WalBatch, DecodeError> {
    if peek_version(frame) < SYNCED_SEQ_FORMAT {
        let b = codec::decode::<WalBatchV1>(frame, Kind::WalBatch)?;
        return Ok(WalBatch {
            seq: b.seq,
            salt: None,
            synced_seq: None,
            ops: b.ops,
        });
    }
    let b = codec::decode::<WalBatchV2>(frame, Kind::WalBatch)?;
    if b.synced_seq >= b.seq {
        return Err(DecodeError::Payload(format!(
            "batch seq {} claims seq {} was synced before it was written",
            b.seq, b.synced_seq
        )));
    }
    Ok(WalBatch {
        seq: b.seq,
        salt: Some(b.salt),
        synced_seq: Some(b.synced_seq),
        ops: b.ops,
    })
}

/// Decodes a segment header frame of either format.
pub(crate) fn decode_header(frame: &[u8]) -> Result<SegmentHeader, DecodeError> {
    if peek_version(frame) < SYNCED_SEQ_FORMAT {
        let h = codec::decode::<SegmentHeaderV1>(frame, Kind::WalSegmentHeader)?;
        return Ok(SegmentHeader {
            format_version: h.format_version,
            first_seq: h.first_seq,
            salt: None,
        });
    }
    let h = codec::decode::<SegmentHeaderV2>(frame, Kind::WalSegmentHeader)?;
    Ok(SegmentHeader {
        format_version: h.format_version,
        first_seq: h.first_seq,
        salt: Some(h.salt),
    })
}

/// A frame that did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadFrame {
    /// Byte offset of the bad frame in its segment.
    pub offset: u64,
    pub reason: String,
    /// Frames after the bad one that do decode (and, in format 2, carry the
    /// segment's salt). After a crash these can be frames written in the
    /// same unsynced group-commit window (never acknowledged); anywhere else
    /// they mean damage.
    pub later_valid_frames: usize,
    /// Of those, the one with the highest `synced_seq` (format 2 only).
    pub proof: Option<Proof>,
}

/// An intact frame after damage, and what it says was synced before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Proof {
    pub offset: u64,
    pub seq: u64,
    pub synced_seq: u64,
}

/// What a segment holds.
#[derive(Debug)]
pub(crate) struct Scan {
    pub header: Option<SegmentHeader>,
    pub batches: Vec<WalBatch>,
    /// Length of the valid prefix (where appending may continue).
    pub valid_len: u64,
    pub file_len: u64,
    pub bad: Option<BadFrame>,
}

/// Reads and checks a whole segment. Never fails on content: damage is
/// reported in [`Scan::bad`]; only I/O errors are errors.
pub(crate) fn scan_segment(path: &Path) -> Result<Scan> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .map_err(|e| JournalError::io("read segment", path, e))?;
    let file_len = buf.len() as u64;
    let mut scan = Scan {
        header: None,
        batches: Vec::new(),
        valid_len: 0,
        file_len,
        bad: None,
    };
    let mut off = 0usize;
    while off < buf.len() {
        let rest = &buf[off..];
        match next_frame(rest, scan.header.as_ref()) {
            Ok((frame, len)) => {
                match frame {
                    Frame::Header(h) => scan.header = Some(h),
                    Frame::Batch(b) => scan.batches.push(b),
                }
                off += len;
                scan.valid_len = off as u64;
            }
            Err(reason) => {
                let start = off + 1;
                let salt = scan.header.as_ref().and_then(|h| h.salt);
                let (later_valid_frames, proof) = valid_after(&buf[start..], start as u64, salt);
                scan.bad = Some(BadFrame {
                    offset: off as u64,
                    reason,
                    later_valid_frames,
                    proof,
                });
                break;
            }
        }
    }
    Ok(scan)
}

enum Frame {
    Header(SegmentHeader),
    Batch(WalBatch),
}

/// Decodes the frame at the start of `rest`: the segment header if `header`
/// is `None` (none read yet), else a batch that must belong to it.
fn next_frame(rest: &[u8], header: Option<&SegmentHeader>) -> Result<(Frame, usize), String> {
    if rest.iter().all(|b| *b == 0) {
        return Err(format!("{} zero bytes at the end", rest.len()));
    }
    let len = envelope::frame_len(rest).map_err(|e| e.to_string())?;
    if len > rest.len() {
        return Err(format!(
            "torn frame: header announces {len} bytes, {} present",
            rest.len()
        ));
    }
    let frame = &rest[..len];
    match header {
        None => {
            let h = decode_header(frame).map_err(|e| format!("segment header: {e}"))?;
            if h.format_version > u32::from(FORMAT_VERSION) {
                return Err(format!(
                    "segment format version {} is newer than this coil supports",
                    h.format_version
                ));
            }
            Ok((Frame::Header(h), len))
        }
        Some(h) => {
            let b = decode_batch(frame).map_err(|e| e.to_string())?;
            if b.salt != h.salt {
                return Err(format!(
                    "batch seq {} does not belong to this segment (salt {:?}, segment {:?})",
                    b.seq, b.salt, h.salt
                ));
            }
            Ok((Frame::Batch(b), len))
        }
    }
}

/// Finds the batch frames that decode anywhere after a damaged spot, by
/// looking for the magic at every offset; `base` is the offset of `buf` in
/// the segment. In a format 2 segment (`salt` known) only frames with the
/// segment's salt count: a stored value may contain bytes that decode as a
/// batch frame, but it cannot know the salt. Returns how many were found and
/// the one that proves the most was synced.
fn valid_after(buf: &[u8], base: u64, salt: Option<u64>) -> (usize, Option<Proof>) {
    let mut count = 0;
    let mut proof: Option<Proof> = None;
    let mut i = 0;
    while i + envelope::HEADER_LEN <= buf.len() {
        if buf[i..i + 4] == MAGIC {
            if let Ok(len) = envelope::frame_len(&buf[i..]) {
                if i + len <= buf.len() {
                    if let Ok(b) = decode_batch(&buf[i..i + len]) {
                        if salt.is_none() || b.salt == salt {
                            count += 1;
                            // Without a salt to check it against, a frame's
                            // claim proves nothing.
                            if let (Some(_), Some(synced_seq)) = (salt, b.synced_seq) {
                                if proof.is_none_or(|p| synced_seq > p.synced_seq) {
                                    proof = Some(Proof {
                                        offset: base + i as u64,
                                        seq: b.seq,
                                        synced_seq,
                                    });
                                }
                            }
                            i += len;
                            continue;
                        }
                    }
                }
            }
        }
        i += 1;
    }
    (count, proof)
}

/// Cuts a segment back to its valid prefix and syncs it.
pub(crate) fn truncate_segment(path: &Path, len: u64) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| JournalError::io("open segment", path, e))?;
    f.set_len(len)
        .map_err(|e| JournalError::io("truncate segment", path, e))?;
    f.sync_all()
        .map_err(|e| JournalError::io("fsync segment", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn op(i: u8) -> WalOpV1 {
        WalOpV1 {
            tree: 1,
            key: vec![i],
            value: Some(vec![i; 10]),
        }
    }

    /// Appends format 2 frames for `seqs`, each written after `synced(seq)`
    /// was synced; returns the offset of each frame and the end.
    fn append(
        seg: &NewSegment,
        seqs: std::ops::RangeInclusive<u64>,
        synced: impl Fn(u64) -> u64,
    ) -> (Vec<u64>, u64) {
        let mut len = seg.len;
        let mut offsets = vec![];
        for seq in seqs {
            let f = encode_batch(seq, seg.salt, synced(seq), &[op(seq as u8)]);
            offsets.push(len);
            write_all_at(&seg.file, &f, len).expect("write");
            len += f.len() as u64;
        }
        (offsets, len)
    }

    fn flip_at(file: &File, at: u64) {
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, at).expect("read");
        b[0] ^= 0x40;
        write_all_at(file, &b, at).expect("write");
    }

    /// Rewrites an envelope as format 1 (version field and checksum): with a
    /// format 1 payload inside, these are the bytes coil wrote before
    /// format 2.
    fn as_format1(mut frame: Vec<u8>) -> Vec<u8> {
        frame[4..6].copy_from_slice(&1u16.to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&frame[..12]);
        h.update(&frame[envelope::HEADER_LEN..]);
        let sum = h.finalize();
        frame[12..16].copy_from_slice(&sum.to_le_bytes());
        frame
    }

    fn format1_batch(seq: u64) -> Vec<u8> {
        as_format1(codec::encode(
            Kind::WalBatch,
            &WalBatchV1 {
                seq,
                ops: vec![op(seq as u8)],
            },
        ))
    }

    fn format1_segment(path: &Path, first_seq: u64, seqs: std::ops::RangeInclusive<u64>) {
        let mut b = as_format1(codec::encode(
            Kind::WalSegmentHeader,
            &SegmentHeaderV1 {
                format_version: 1,
                first_seq,
            },
        ));
        for seq in seqs {
            b.extend_from_slice(&format1_batch(seq));
        }
        fs::write(path, b).expect("write");
    }

    #[test]
    fn scan_reads_back_what_was_written_and_stops_at_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seg = create_segment(dir.path(), 5).expect("segment");
        let (_, len) = append(&seg, 5..=9, |s| s - 1);
        let path = segment_path(dir.path(), 5);
        let scan = scan_segment(&path).expect("scan");
        assert_eq!(scan.batches.len(), 5);
        assert_eq!(scan.valid_len, len);
        assert!(scan.bad.is_none());
        let h = scan.header.expect("header");
        assert_eq!((h.first_seq, h.salt), (5, Some(seg.salt)));
        assert_eq!(scan.batches[2].synced_seq, Some(6));

        // A half-written frame at the end.
        let f = encode_batch(10, seg.salt, 9, &[op(10)]);
        write_all_at(&seg.file, &f[..f.len() / 2], len).expect("write");
        let scan = scan_segment(&path).expect("scan");
        assert_eq!(scan.batches.len(), 5);
        assert_eq!(scan.valid_len, len);
        let bad = scan.bad.expect("torn tail reported");
        assert_eq!(bad.offset, len);
        assert_eq!(bad.later_valid_frames, 0);
        assert_eq!(bad.proof, None);

        truncate_segment(&path, scan.valid_len).expect("truncate");
        let scan = scan_segment(&path).expect("scan");
        assert!(scan.bad.is_none());
        assert_eq!(scan.batches.last().map(|b| b.seq), Some(9));
    }

    #[test]
    fn damage_in_the_middle_reports_the_frames_after_it_and_what_they_prove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seg = create_segment(dir.path(), 1).expect("segment");
        // Sequential commits: each frame written after the previous synced.
        let (offsets, _) = append(&seg, 1..=4, |s| s - 1);
        flip_at(&seg.file, offsets[1] + envelope::HEADER_LEN as u64 + 3);
        let scan = scan_segment(&segment_path(dir.path(), 1)).expect("scan");
        assert_eq!(scan.batches.len(), 1);
        let bad = scan.bad.expect("bad frame");
        assert_eq!(bad.offset, offsets[1]);
        assert_eq!(bad.later_valid_frames, 2);
        assert_eq!(
            bad.proof,
            Some(Proof {
                offset: offsets[3],
                seq: 4,
                synced_seq: 3
            })
        );
    }

    #[test]
    fn frames_of_one_unsynced_window_prove_nothing_about_each_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seg = create_segment(dir.path(), 1).expect("segment");
        // Seqs 1-2 synced; 3-5 written together before the next sync.
        let (offsets, _) = append(&seg, 1..=5, |s| if s <= 2 { s - 1 } else { 2 });
        flip_at(&seg.file, offsets[2] + envelope::HEADER_LEN as u64 + 1);
        let bad = scan_segment(&segment_path(dir.path(), 1))
            .expect("scan")
            .bad
            .expect("bad frame");
        assert_eq!(bad.later_valid_frames, 2);
        let p = bad.proof.expect("the later frames are found");
        assert_eq!(p.synced_seq, 2, "below the damaged seq 3: no proof");
    }

    #[test]
    fn a_batch_lookalike_inside_a_value_is_neither_counted_nor_proof() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seg = create_segment(dir.path(), 1).expect("segment");
        let (_, len) = append(&seg, 1..=1, |_| 0);
        // A caller stores the bytes of a valid-looking batch frame that
        // claims everything is synced; the frame carrying it is torn.
        let fake = encode_batch(u64::MAX, 12345, u64::MAX - 1, &[op(9)]);
        let carrier = encode_batch(
            2,
            seg.salt,
            1,
            &[WalOpV1 {
                tree: 6,
                key: b"k".to_vec(),
                value: Some(fake.clone()),
            }],
        );
        let cut = carrier.len() - 3;
        write_all_at(&seg.file, &carrier[..cut], len).expect("write");
        let scan = scan_segment(&segment_path(dir.path(), 1)).expect("scan");
        let bad = scan.bad.expect("torn");
        assert_eq!(bad.later_valid_frames, 0);
        assert_eq!(bad.proof, None);
        // A frame with another segment's salt in the sequence is damage.
        let dir2 = tempfile::tempdir().expect("tempdir");
        let seg2 = create_segment(dir2.path(), 1).expect("segment");
        let f = encode_batch(1, seg2.salt.wrapping_add(1), 0, &[op(1)]);
        write_all_at(&seg2.file, &f, seg2.len).expect("write");
        let bad = scan_segment(&segment_path(dir2.path(), 1))
            .expect("scan")
            .bad
            .expect("foreign frame");
        assert!(bad.reason.contains("does not belong"), "{}", bad.reason);
    }

    #[test]
    fn format1_segments_are_read_and_their_damage_proves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = segment_path(dir.path(), 1);
        format1_segment(&path, 1, 1..=4);
        let scan = scan_segment(&path).expect("scan");
        assert!(scan.bad.is_none(), "{:?}", scan.bad);
        let h = scan.header.expect("header");
        assert_eq!((h.format_version, h.salt), (1, None));
        let seqs: Vec<_> = scan.batches.iter().map(|b| (b.seq, b.synced_seq)).collect();
        assert_eq!(seqs, [(1, None), (2, None), (3, None), (4, None)]);
        assert_eq!(scan.batches[3].ops, [op(4)]);

        let mut b = fs::read(&path).expect("read");
        let at = b.len() - 2 * format1_batch(4).len() + 20;
        b[at] ^= 1;
        fs::write(&path, &b).expect("write");
        let bad = scan_segment(&path).expect("scan").bad.expect("bad");
        assert_eq!(bad.later_valid_frames, 1);
        assert_eq!(bad.proof, None);
    }

    #[test]
    fn a_frame_claiming_its_own_seq_was_synced_is_refused() {
        let f = encode_batch(7, 1, 7, &[op(1)]);
        assert!(decode_batch(&f).is_err());
        assert!(decode_batch(&encode_batch(7, 1, 6, &[op(1)])).is_ok());
    }
}
