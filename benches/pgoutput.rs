//! Pure decode and value→JSON rates (no PostgreSQL): `cargo bench --bench pgoutput`.
//!
//! Messages are built with walcast's own encoder in the shape of the
//! `orders` table walcast serves (uuids, text, jsonb, timestamptz).

#![allow(missing_docs)] // criterion_group! generates an undocumented pub fn

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use walcast::change::{Assembler, TxEvent};
use walcast::lsn::Lsn;
use walcast::pgoutput::{
    decode, encode, Begin, Column, Commit, Insert, Message, PgTimestamp, Relation, ReplicaIdentity, TupleData,
    TupleValue,
};

mod common;

use common::{ORDERS_OID, ORDER_COLUMNS};

fn column(name: &str, type_oid: u32, key: bool) -> Column {
    Column { flags: u8::from(key), name: name.into(), type_oid, type_modifier: -1 }
}

fn orders_relation() -> Message {
    Message::Relation(Relation {
        xid: None,
        oid: ORDERS_OID,
        namespace: "public".into(),
        name: "orders".into(),
        replica_identity: ReplicaIdentity::Full,
        columns: ORDER_COLUMNS.iter().map(|&(name, oid)| column(name, oid, name == "id")).collect(),
    })
}

fn text(s: &str) -> TupleValue {
    TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn orders_row(i: u32) -> TupleData {
    TupleData {
        columns: vec![
            text(&format!("a0eebc99-9c0b-4ef8-bb6d-{i:012x}")),
            text("7d9f3c1e-2b4a-4c6d-8e0f-1a2b3c4d5e6f"),
            text(&format!("NORTH-SALES-{i:06}")),
            text("sales"),
            text("pending"),
            text(r#"{"name": "Jane Doe", "email": "jane@example.com", "phone": "+1 555 0100"}"#),
            text(r#"{"vin": "1HGCM82633A004352", "make": "Honda", "year": 2024, "model": "Accord"}"#),
            TupleValue::Null,
            text("{}"),
            text("3f2504e0-4f89-11d3-9a0c-0305e82c3301"),
            TupleValue::Null,
            text("2026-11-25 10:00:00.123456+00"),
            text("2026-11-25 10:00:00.123456+00"),
        ],
    }
}

fn insert(i: u32) -> Message {
    Message::Insert(Insert { xid: None, relation_oid: ORDERS_OID, new: orders_row(i) })
}

fn bench_decode(c: &mut Criterion) {
    let relation = Bytes::from(encode(&orders_relation(), false));
    let insert = Bytes::from(encode(&insert(7), false));
    let mut group = c.benchmark_group("pgoutput_decode");
    group.throughput(Throughput::Bytes(insert.len() as u64));
    group.bench_function("insert_orders_row", |b| b.iter(|| decode(black_box(&insert)).unwrap()));
    group.throughput(Throughput::Elements(1));
    group.bench_function("relation_orders", |b| b.iter(|| decode(black_box(&relation)).unwrap()));
    group.finish();
}

/// Begin, 100 orders inserts, Commit: decode + relation lookup + typed rows.
fn transaction(rows: u32) -> Vec<Bytes> {
    let mut out = vec![Bytes::from(encode(
        &Message::Begin(Begin { final_lsn: Lsn(0x1000), commit_timestamp: PgTimestamp(0), xid: 42 }),
        false,
    ))];
    out.extend((0..rows).map(|i| Bytes::from(encode(&insert(i), false))));
    out.push(Bytes::from(encode(
        &Message::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(0x1000),
            end_lsn: Lsn(0x1010),
            commit_timestamp: PgTimestamp(0),
        }),
        false,
    )));
    out
}

fn bench_assemble(c: &mut Criterion) {
    let relation = Bytes::from(encode(&orders_relation(), false));
    let tx = transaction(100);
    let mut group = c.benchmark_group("change_assemble");
    group.throughput(Throughput::Elements(100));
    group.bench_function("orders_tx_100_rows", |b| {
        let mut assembler = Assembler::new();
        let mut events = Vec::new();
        assembler.push(&relation, &mut events).unwrap();
        b.iter(|| {
            for message in &tx {
                assembler.push(message, &mut events).unwrap();
            }
            events.clear();
        })
    });
    group.finish();
}

fn bench_json(c: &mut Criterion) {
    let relation = Bytes::from(encode(&orders_relation(), false));
    let mut assembler = Assembler::new();
    let mut events = Vec::new();
    assembler.push(&relation, &mut events).unwrap();
    for message in transaction(1) {
        assembler.push(&message, &mut events).unwrap();
    }
    let change = events
        .iter()
        .find_map(|e| if let TxEvent::Change(c) = e { Some(c.clone()) } else { None })
        .expect("one change");
    let row = change.record.clone().unwrap();
    let mut out = Vec::with_capacity(1024);
    change.write_row_json(&row, &mut out);
    let mut group = c.benchmark_group("value_json");
    group.throughput(Throughput::Bytes(out.len() as u64));
    group.bench_function("orders_record", |b| {
        b.iter_batched_ref(
            || Vec::with_capacity(1024),
            |out| change.write_row_json(black_box(&row), out),
            BatchSize::SmallInput,
        )
    });
    group.finish();

    let mut group = c.benchmark_group("value_json_kind");
    let cases: [(&str, u32, &str); 6] = [
        ("int8", 20, "9007199254740993"),
        ("numeric", 1700, "123456789.000000000000000001"),
        ("timestamptz", 1184, "2026-11-25 10:00:00.123456+00"),
        ("jsonb", 3802, r#"{"a": [1, 2.5, {"b": null}], "name": "x \"y\""}"#),
        ("text_array", 1009, r#"{"a b","c\"d",NULL,plain}"#),
        ("text", 25, "the quick brown fox jumps over the lazy dog"),
    ];
    for (name, oid, text) in cases {
        let kind = walcast::change::value::kind_of(oid);
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(name, |b| {
            let mut out = Vec::with_capacity(256);
            b.iter(|| {
                out.clear();
                walcast::change::value::write_json(black_box(&kind), black_box(text), &mut out);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_decode, bench_assemble, bench_json);
criterion_main!(benches);
