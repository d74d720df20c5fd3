//! The spill record: one change, length-prefixed, little-endian.
//!
//! ```text
//!  u32 record length (including itself) | u32 tag | u8 op | u32 relation index
//!  | row? record | row? old_record | u32 n, n × (u32 len, bytes) missing_toast
//!  row?  = u8 0 (none) | u8 1, u32 columns, columns × datum
//!  datum = u8 0 (null) | u8 2 (absent) | u8 1, u32 len, bytes
//! ```
//!
//! Decoding checks every length and returns `None` on anything malformed;
//! text values are zero-copy slices of the record.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::change::{Change, Datum, Op, RelationInfo, Row};

/// Appends the record for `change` to `out`.
pub(super) fn encode(tag: u32, relation: u32, change: &Change, out: &mut BytesMut) {
    let start = out.len();
    out.put_u32_le(0);
    out.put_u32_le(tag);
    out.put_u8(match change.op {
        Op::Insert => 0,
        Op::Update => 1,
        Op::Delete => 2,
        Op::Truncate => 3,
    });
    out.put_u32_le(relation);
    put_row(change.record.as_ref(), out);
    put_row(change.old_record.as_ref(), out);
    out.put_u32_le(change.missing_toast.len() as u32);
    for name in &change.missing_toast {
        out.put_u32_le(name.len() as u32);
        out.put_slice(name.as_bytes());
    }
    let len = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

fn put_row(row: Option<&Row>, out: &mut BytesMut) {
    let Some(row) = row else {
        out.put_u8(0);
        return;
    };
    out.put_u8(1);
    out.put_u32_le(row.0.len() as u32);
    for datum in &row.0 {
        match datum {
            Datum::Null => out.put_u8(0),
            Datum::Absent => out.put_u8(2),
            Datum::Text(bytes) => {
                out.put_u8(1);
                out.put_u32_le(bytes.len() as u32);
                out.put_slice(bytes);
            }
        }
    }
}

/// The length of the record starting `buf`, once its prefix is there.
pub(super) fn frame_len(buf: &[u8]) -> Option<usize> {
    let prefix: [u8; 4] = buf.get(..4)?.try_into().ok()?;
    Some(u32::from_le_bytes(prefix) as usize)
}

/// Decodes one whole record.
pub(super) fn decode(record: &Bytes, relations: &[Arc<RelationInfo>]) -> Option<(u32, Change)> {
    let mut r = record.clone();
    let len = take_u32(&mut r)? as usize;
    if len != record.len() || len < 4 {
        return None;
    }
    let tag = take_u32(&mut r)?;
    let op = match take_u8(&mut r)? {
        0 => Op::Insert,
        1 => Op::Update,
        2 => Op::Delete,
        3 => Op::Truncate,
        _ => return None,
    };
    let relation = Arc::clone(relations.get(take_u32(&mut r)? as usize)?);
    let width = relation.columns.len();
    let record_row = take_row(&mut r, width)?;
    let old_record = take_row(&mut r, width)?;
    let n = take_u32(&mut r)? as usize;
    let mut missing_toast = Vec::with_capacity(n.min(width));
    for _ in 0..n {
        let bytes = take_bytes(&mut r)?;
        missing_toast.push(String::from_utf8(bytes.to_vec()).ok()?);
    }
    if r.has_remaining() {
        return None;
    }
    Some((tag, Change { relation, op, record: record_row, old_record, missing_toast }))
}

fn take_u8(r: &mut Bytes) -> Option<u8> {
    r.has_remaining().then(|| r.get_u8())
}

fn take_u32(r: &mut Bytes) -> Option<u32> {
    (r.remaining() >= 4).then(|| r.get_u32_le())
}

fn take_bytes(r: &mut Bytes) -> Option<Bytes> {
    let len = take_u32(r)? as usize;
    (r.remaining() >= len).then(|| r.split_to(len))
}

fn take_row(r: &mut Bytes, width: usize) -> Option<Option<Row>> {
    match take_u8(r)? {
        0 => Some(None),
        1 => {
            let n = take_u32(r)? as usize;
            if n != width {
                return None;
            }
            let mut row = Vec::with_capacity(n);
            for _ in 0..n {
                row.push(match take_u8(r)? {
                    0 => Datum::Null,
                    2 => Datum::Absent,
                    1 => Datum::Text(take_bytes(r)?),
                    _ => return None,
                });
            }
            Some(Some(Row(row)))
        }
        _ => None,
    }
}
