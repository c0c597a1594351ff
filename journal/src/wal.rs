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

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::codec::{self, SegmentHeaderV1, WalBatchV1, WalOpV1};
use crate::durable;
use crate::envelope::{self, DecodeError, Kind, FORMAT_VERSION, MAGIC};
use crate::error::{JournalError, Result};

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

/// Creates a new segment whose first batch will carry `first_seq`: the file
/// is created, its header written and synced, and the directory synced,
/// before anything is appended to it.
pub(crate) fn create_segment(dir: &Path, first_seq: u64) -> Result<(File, u64)> {
    let path = segment_path(dir, first_seq);
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(true);
    let file = opts
        .open(&path)
        .map_err(|e| JournalError::io("create segment", &path, e))?;
    let header = codec::encode(
        Kind::WalSegmentHeader,
        &SegmentHeaderV1 {
            format_version: u32::from(FORMAT_VERSION),
            first_seq,
        },
    );
    write_all_at(&file, &header, 0)
        .map_err(|e| JournalError::io("write segment header", &path, e))?;
    file.sync_all()
        .map_err(|e| JournalError::io("fsync segment", &path, e))?;
    durable::sync_dir(dir)?;
    Ok((file, header.len() as u64))
}

/// Writes all of `buf` at `offset`.
pub(crate) fn write_all_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(buf, offset)
}

/// Encodes one batch frame.
pub(crate) fn encode_batch(seq: u64, ops: &[WalOpV1]) -> Vec<u8> {
    // Cloning the ops into the persisted struct would cost an allocation per
    // op; serialize a borrowed view with the same layout instead.
    #[derive(serde::Serialize)]
    struct View<'a> {
        seq: u64,
        ops: &'a [WalOpV1],
    }
    codec::encode(Kind::WalBatch, &View { seq, ops })
}

/// A frame that did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadFrame {
    /// Byte offset of the bad frame in its segment.
    pub offset: u64,
    pub reason: String,
    /// Frames after the bad one that do decode. After a crash these can be
    /// frames written in the same unsynced group-commit window (never
    /// acknowledged); anywhere else they mean damage.
    pub later_valid_frames: usize,
}

/// What a segment holds.
#[derive(Debug)]
pub(crate) struct Scan {
    pub header: Option<SegmentHeaderV1>,
    pub batches: Vec<WalBatchV1>,
    /// Length of the valid prefix (where appending may continue).
    pub valid_len: u64,
    pub file_len: u64,
    pub bad: Option<BadFrame>,
}

fn decode_batch(frame: &[u8]) -> Result<WalBatchV1, DecodeError> {
    codec::decode::<WalBatchV1>(frame, Kind::WalBatch)
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
        match next_frame(rest, scan.header.is_none()) {
            Ok((frame, len)) => {
                match frame {
                    Frame::Header(h) => scan.header = Some(h),
                    Frame::Batch(b) => scan.batches.push(b),
                }
                off += len;
                scan.valid_len = off as u64;
            }
            Err(reason) => {
                scan.bad = Some(BadFrame {
                    offset: off as u64,
                    reason,
                    later_valid_frames: count_valid_after(&buf[off + 1..]),
                });
                break;
            }
        }
    }
    Ok(scan)
}

enum Frame {
    Header(SegmentHeaderV1),
    Batch(WalBatchV1),
}

fn next_frame(rest: &[u8], want_header: bool) -> Result<(Frame, usize), String> {
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
    if want_header {
        let h = codec::decode::<SegmentHeaderV1>(frame, Kind::WalSegmentHeader)
            .map_err(|e| format!("segment header: {e}"))?;
        if h.format_version > u32::from(FORMAT_VERSION) {
            return Err(format!(
                "segment format version {} is newer than this coil supports",
                h.format_version
            ));
        }
        Ok((Frame::Header(h), len))
    } else {
        let b = decode_batch(frame).map_err(|e| e.to_string())?;
        Ok((Frame::Batch(b), len))
    }
}

/// Counts the frames that decode anywhere after a damaged spot, by looking
/// for the magic at every offset.
fn count_valid_after(buf: &[u8]) -> usize {
    let mut count = 0;
    let mut i = 0;
    while i + envelope::HEADER_LEN <= buf.len() {
        if buf[i..i + 4] == MAGIC {
            if let Ok(len) = envelope::frame_len(&buf[i..]) {
                if i + len <= buf.len() && decode_batch(&buf[i..i + len]).is_ok() {
                    count += 1;
                    i += len;
                    continue;
                }
            }
        }
        i += 1;
    }
    count
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

    fn op(i: u8) -> WalOpV1 {
        WalOpV1 {
            tree: 1,
            key: vec![i],
            value: Some(vec![i; 10]),
        }
    }

    #[test]
    fn scan_reads_back_what_was_written_and_stops_at_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (file, mut len) = create_segment(dir.path(), 5).expect("segment");
        for seq in 5..10u64 {
            let f = encode_batch(seq, &[op(seq as u8)]);
            write_all_at(&file, &f, len).expect("write");
            len += f.len() as u64;
        }
        let path = segment_path(dir.path(), 5);
        let scan = scan_segment(&path).expect("scan");
        assert_eq!(scan.batches.len(), 5);
        assert_eq!(scan.valid_len, len);
        assert!(scan.bad.is_none());
        assert_eq!(scan.header.expect("header").first_seq, 5);

        // A half-written frame at the end.
        let f = encode_batch(10, &[op(10)]);
        write_all_at(&file, &f[..f.len() / 2], len).expect("write");
        let scan = scan_segment(&path).expect("scan");
        assert_eq!(scan.batches.len(), 5);
        assert_eq!(scan.valid_len, len);
        let bad = scan.bad.expect("torn tail reported");
        assert_eq!(bad.offset, len);
        assert_eq!(bad.later_valid_frames, 0);

        truncate_segment(&path, scan.valid_len).expect("truncate");
        let scan = scan_segment(&path).expect("scan");
        assert!(scan.bad.is_none());
        assert_eq!(scan.batches.last().map(|b| b.seq), Some(9));
    }

    #[test]
    fn damage_in_the_middle_reports_the_valid_frames_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (file, mut len) = create_segment(dir.path(), 1).expect("segment");
        let mut offsets = vec![];
        for seq in 1..=4u64 {
            let f = encode_batch(seq, &[op(seq as u8)]);
            offsets.push(len);
            write_all_at(&file, &f, len).expect("write");
            len += f.len() as u64;
        }
        // Flip a payload byte of frame 2.
        let target = offsets[1] + envelope::HEADER_LEN as u64 + 3;
        let mut b = [0u8; 1];
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut b, target).expect("read");
        b[0] ^= 0x40;
        write_all_at(&file, &b, target).expect("write");
        let scan = scan_segment(&segment_path(dir.path(), 1)).expect("scan");
        assert_eq!(scan.batches.len(), 1);
        let bad = scan.bad.expect("bad frame");
        assert_eq!(bad.offset, offsets[1]);
        assert_eq!(bad.later_valid_frames, 2);
    }
}
