//! Serialized frames of the fan-out: the `data` object of a postgres_changes
//! event, built once per change and event type, and the Phoenix frame around
//! it, built once per distinct (vsn, topic, binding ids, event type) and
//! shared as `Bytes` by every subscriber that receives it.
//!
//! Shapes follow Supabase Realtime (see `realtime-protocol.md` §4.2): vsn
//! 1.0.0 `{"topic","event","payload","ref":null}`, vsn 2.0.0
//! `[null,null,topic,"postgres_changes",payload]`; `payload` =
//! `{"ids":[…],"data":{…}}`; `data` has schema, table, commit_timestamp
//! (`…SS.mmmZ`), type, columns, `record` (INSERT, UPDATE), `old_record`
//! (UPDATE, DELETE) and errors. A record whose JSON exceeds the record limit
//! keeps only values of ≤ 64 bytes and says `"errors":["Error 413: Payload
//! Too Large"]`, as Supabase does.

use std::fmt::Write as _;
use std::io::Write as _;

use bytes::Bytes;

use crate::change::{Change, RelationInfo};
use crate::pgoutput::PgTimestamp;
use crate::policy::EventType;

/// Phoenix serializer version of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Vsn {
    /// 1.0.0: JSON objects.
    V1,
    /// 2.0.0: JSON arrays.
    V2,
}

/// Supabase's per-record limit (`max_record_bytes`).
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// Values kept in an oversized record.
const OVERSIZED_VALUE_MAX: usize = 64;

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of a commit timestamp.
pub fn commit_timestamp(ts: PgTimestamp) -> String {
    let micros = ts.unix_micros();
    let secs = micros.div_euclid(1_000_000);
    let millis = micros.rem_euclid(1_000_000) / 1000;
    let (y, m, d) = crate::capture::civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    // Sized up front: `format!` would grow its buffer twice.
    let mut out = String::with_capacity(24);
    let _ = write!(out, "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z", rem / 3600, rem / 60 % 60, rem % 60);
    out
}

/// `[{"name":…,"type":…},…]` of a relation (cache it per relation), only
/// the columns `mask` keeps when given.
pub fn columns_json(relation: &RelationInfo, mask: Option<&[bool]>) -> Bytes {
    let mut out = Vec::with_capacity(32 * relation.columns.len() + 2);
    out.push(b'[');
    let mut first = true;
    for (i, column) in relation.columns.iter().enumerate() {
        if mask.is_some_and(|m| !m.get(i).copied().unwrap_or(false)) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(b"{\"name\":");
        json_string(&column.name, &mut out);
        out.extend_from_slice(b",\"type\":");
        json_string(&column.type_name, &mut out);
        out.push(b'}');
    }
    out.push(b']');
    Bytes::from(out)
}

/// The `data` object of `change` delivered as `event`; with `mask`, only the
/// columns it keeps (a role's column privileges, a binding's `select`).
pub fn data_json(
    change: &Change,
    event: EventType,
    commit_timestamp: &str,
    columns: &[u8],
    mask: Option<&[bool]>,
) -> Bytes {
    // Room for the rows written (their text plus a per-column allowance
    // covers keys and quoting in the usual case), so the buffer seldom grows.
    let record = matches!(event, EventType::Insert | EventType::Update).then_some(change.record.as_ref()).flatten();
    let old = matches!(event, EventType::Update | EventType::Delete).then_some(change.old_record.as_ref()).flatten();
    let rows = record.map_or(0, crate::change::Row::byte_size) + old.map_or(0, crate::change::Row::byte_size);
    let mut out = Vec::with_capacity(
        160 + change.relation.schema.len()
            + change.relation.table.len()
            + commit_timestamp.len()
            + columns.len()
            + rows,
    );
    out.extend_from_slice(b"{\"schema\":");
    json_string(&change.relation.schema, &mut out);
    out.extend_from_slice(b",\"table\":");
    json_string(&change.relation.table, &mut out);
    out.extend_from_slice(b",\"commit_timestamp\":\"");
    out.extend_from_slice(commit_timestamp.as_bytes());
    out.extend_from_slice(b"\",\"type\":\"");
    out.extend_from_slice(event.as_str().as_bytes());
    out.extend_from_slice(b"\",\"columns\":");
    out.extend_from_slice(columns);
    let mut oversized = false;
    let mut row = |key: &[u8], row: Option<&crate::change::Row>, out: &mut Vec<u8>| {
        out.extend_from_slice(key);
        let Some(row) = row else {
            out.extend_from_slice(b"{}");
            return;
        };
        let start = out.len();
        change.write_row_json_masked(row, None, mask, out);
        if out.len() - start > MAX_RECORD_BYTES {
            out.truncate(start);
            change.write_row_json_masked(row, Some(OVERSIZED_VALUE_MAX), mask, out);
            oversized = true;
        }
    };
    if matches!(event, EventType::Insert | EventType::Update) {
        row(b",\"record\":", change.record.as_ref(), &mut out);
    }
    if matches!(event, EventType::Update | EventType::Delete) {
        row(b",\"old_record\":", change.old_record.as_ref(), &mut out);
    }
    if oversized {
        out.extend_from_slice(b",\"errors\":[\"Error 413: Payload Too Large\"]}");
    } else {
        out.extend_from_slice(b",\"errors\":null}");
    }
    Bytes::from(out)
}

/// The postgres_changes frame for `topic` with binding `ids` around `data`.
pub fn postgres_changes(vsn: Vsn, topic: &str, ids: &[u32], data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + topic.len() + 96);
    match vsn {
        Vsn::V1 => {
            out.extend_from_slice(b"{\"topic\":");
            json_string(topic, &mut out);
            out.extend_from_slice(b",\"event\":\"postgres_changes\",\"payload\":");
        }
        Vsn::V2 => {
            out.extend_from_slice(b"[null,null,");
            json_string(topic, &mut out);
            out.extend_from_slice(b",\"postgres_changes\",");
        }
    }
    out.extend_from_slice(b"{\"ids\":[");
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = write!(out, "{id}");
    }
    out.extend_from_slice(b"],\"data\":");
    out.extend_from_slice(data);
    out.push(b'}');
    match vsn {
        Vsn::V1 => out.extend_from_slice(b",\"ref\":null}"),
        Vsn::V2 => out.push(b']'),
    }
    Bytes::from(out)
}

fn json_string(text: &str, out: &mut Vec<u8>) {
    let _ = serde_json::to_writer(&mut *out, text);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{ColumnInfo, Datum, Op, Row};
    use crate::pgoutput::ReplicaIdentity;
    use std::sync::Arc;

    fn change(op: Op, big: bool) -> Change {
        let col = |name: &str, oid: u32| ColumnInfo {
            name: name.into(),
            type_name: crate::change::value::builtin_type_name(oid).unwrap().into(),
            type_oid: oid,
            is_key: name == "id",
            kind: crate::change::value::kind_of(oid),
        };
        let relation = Arc::new(RelationInfo {
            oid: 1,
            schema: "public".into(),
            table: "orders".into(),
            replica_identity: ReplicaIdentity::Full,
            columns: vec![col("id", 23), col("doc", 25)],
        });
        let doc = if big { "x".repeat(MAX_RECORD_BYTES + 1) } else { "a \"b\"".into() };
        let row = Row(vec![Datum::Text("7".into()), Datum::Text(doc.into())]);
        Change {
            relation,
            op,
            record: (op != Op::Delete).then(|| row.clone()),
            old_record: (op != Op::Insert).then_some(row),
            missing_toast: vec![],
        }
    }

    #[test]
    fn timestamps_have_milliseconds_and_z() {
        assert_eq!(commit_timestamp(PgTimestamp(0)), "2000-01-01T00:00:00.000Z");
        assert_eq!(commit_timestamp(PgTimestamp(849_011_730_123_456)), "2026-11-26T12:35:30.123Z");
        assert_eq!(commit_timestamp(PgTimestamp(-1)), "1999-12-31T23:59:59.999Z");
    }

    #[test]
    fn frames_in_both_vsn_parse_and_carry_the_right_keys() {
        let c = change(Op::Update, false);
        let columns = columns_json(&c.relation, None);
        for (event, record, old) in
            [(EventType::Update, true, true), (EventType::Insert, true, false), (EventType::Delete, false, true)]
        {
            let data = data_json(&c, event, "2026-01-01T00:00:00.000Z", &columns, None);
            let v1: serde_json::Value =
                serde_json::from_slice(&postgres_changes(Vsn::V1, "realtime:a\"b", &[3, 4], &data)).unwrap();
            assert_eq!(v1["topic"], "realtime:a\"b");
            assert_eq!(v1["event"], "postgres_changes");
            assert_eq!(v1["ref"], serde_json::Value::Null);
            assert_eq!(v1["payload"]["ids"], serde_json::json!([3, 4]));
            let d = &v1["payload"]["data"];
            assert_eq!(d["type"], event.as_str());
            assert_eq!(d["columns"], serde_json::json!([{"name":"id","type":"int4"},{"name":"doc","type":"text"}]));
            assert_eq!(d.get("record").is_some(), record);
            assert_eq!(d.get("old_record").is_some(), old);
            assert_eq!(d["errors"], serde_json::Value::Null);
            if record {
                assert_eq!(d["record"], serde_json::json!({"id": 7, "doc": "a \"b\""}));
            }
            let v2: serde_json::Value =
                serde_json::from_slice(&postgres_changes(Vsn::V2, "realtime:x", &[], &data)).unwrap();
            assert_eq!(v2[0], serde_json::Value::Null);
            assert_eq!(v2[1], serde_json::Value::Null);
            assert_eq!(v2[2], "realtime:x");
            assert_eq!(v2[3], "postgres_changes");
            assert_eq!(v2[4]["data"], *d);
        }
    }

    #[test]
    fn oversized_records_keep_small_values_and_say_413() {
        let c = change(Op::Insert, true);
        let data = data_json(&c, EventType::Insert, "t", &columns_json(&c.relation, None), None);
        let d: serde_json::Value = serde_json::from_slice(&data).unwrap();
        assert_eq!(d["record"], serde_json::json!({"id": 7}));
        assert_eq!(d["errors"], serde_json::json!(["Error 413: Payload Too Large"]));
    }
}
