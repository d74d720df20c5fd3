//! The change stage end to end against a real PostgreSQL: replication source →
//! assembler, typed JSON compared with PostgreSQL's own `to_jsonb`, old-record
//! rules per replica identity, unchanged TOAST, transactions and rollbacks.

use walcast::change::{Op, TxEvent};

use crate::support::migrated_db;
use crate::support::pipeline::{changes, Pipeline};

#[tokio::test]
async fn every_type_matches_postgres_to_jsonb() {
    let (db, client) = migrated_db().await;
    client
        .batch_execute(
            "create type mood as enum ('ok', 'happy');
             create table public.typed (
                 id int primary key, b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8, n numeric,
                 n_big numeric, t text, vc varchar(20), bp char(3), u uuid, j json, jb jsonb,
                 ts timestamp, tstz timestamptz, d date, tm time, tmtz timetz, iv interval, by bytea,
                 e mood, ai int4[], at text[], ajb jsonb[], atstz timestamptz[], ai2d int4[][], anull text[],
                 ae mood[], inet_ inet, money_ money, oid_ oid
             );
             alter table public.typed replica identity full;
             create publication walcast_types for table public.typed;",
        )
        .await
        .unwrap();
    let slot = format!("{}_s", db.name());
    let mut pipeline = Pipeline::start(db.url(), &slot, "walcast_types").await;
    client
        .batch_execute(
            r#"set timezone = 'UTC';
            insert into public.typed values (
                1, true, -32768, 2147483647, 9007199254740993, 1.5, -2.25e-10, 123.4500,
                '123456789012345678901234567890.000000000000000001', 'héllo "quoted" \ back', 'vc', 'ab',
                'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"b": 1, "a": [1, 2.50]}', '{"z": null, "a": {"n": 1.0}}',
                '2024-01-02 03:04:05.5', '2024-01-02 03:04:05.123456+02', '2024-02-29', '13:14:15', '13:14:15+05:30',
                '1 year 2 mons 3 days 04:05:06.7', '\x0001ff', 'happy', '{1,2,3}', '{"a b","c\"d",NULL,"NULL"}',
                array['{"k": 1}'::jsonb, '[]'::jsonb], array['2024-01-02 03:04:05+00'::timestamptz],
                '{{1,2},{3,4}}', null, '{ok,happy}', '192.168.0.1/24', '12.34', 42
            );
            insert into public.typed (id) values (2);"#,
        )
        .await
        .unwrap();
    let mut records = Vec::new();
    while records.len() < 2 {
        let tx = pipeline.next_tx().await;
        for c in changes(&tx) {
            assert_eq!(c.op, Op::Insert);
            let mut raw = Vec::new();
            c.write_row_json(c.record.as_ref().unwrap(), &mut raw);
            let parsed: serde_json::Value = serde_json::from_slice(&raw)
                .unwrap_or_else(|e| panic!("walcast wrote invalid JSON ({e}): {}", String::from_utf8_lossy(&raw)));
            records.push(parsed);
        }
    }
    // The walsender session is pinned (UTC, ISO dates, PostgreSQL-style intervals); compare under the same settings.
    client
        .batch_execute("set timezone = 'UTC'; set intervalstyle = 'postgres'; set extra_float_digits = 3")
        .await
        .unwrap();
    let rows = client.query("select to_jsonb(r) from public.typed r order by id", &[]).await.unwrap();
    for (got, row) in records.iter().zip(rows.iter()) {
        let want: serde_json::Value = row.get(0);
        let (got, want) = (
            got.as_object().unwrap_or_else(|| panic!("got {got}")),
            want.as_object().unwrap_or_else(|| panic!("want {want}")),
        );
        for (column, want_value) in want {
            assert_eq!(
                got.get(column),
                Some(want_value),
                "column {column}: walcast {:?} vs to_jsonb {want_value}",
                got.get(column)
            );
        }
        assert_eq!(got.len(), want.len());
    }
    // The column list carries PostgreSQL's type names.
    let tx_columns: Vec<(String, String)> = {
        client.execute("insert into public.typed (id) values (3)", &[]).await.unwrap();
        let tx = pipeline.next_tx().await;
        let rel = &changes(&tx)[0].relation;
        rel.columns.iter().map(|c| (c.name.clone(), c.type_name.clone())).collect()
    };
    let names: std::collections::HashMap<_, _> = tx_columns.into_iter().collect();
    for (col, ty) in [
        ("i8", "int8"),
        ("tstz", "timestamptz"),
        ("jb", "jsonb"),
        ("ai", "_int4"),
        ("e", "mood"),
        ("ae", "_mood"),
        ("u", "uuid"),
        ("vc", "varchar"),
        ("bp", "bpchar"),
    ] {
        assert_eq!(names.get(col).map(String::as_str), Some(ty), "type name of {col}");
    }
}

#[tokio::test]
async fn insert_update_delete_truncate_and_identity_rules() {
    let (db, client) = migrated_db().await;
    client
        .batch_execute(
            "create table public.plain (id int primary key, v text, w text);
             create table public.full_ (id int primary key, v text, w text);
             alter table public.full_ replica identity full;
             create publication walcast_rules for table public.plain, public.full_;",
        )
        .await
        .unwrap();
    let slot = format!("{}_s", db.name());
    let mut p = Pipeline::start(db.url(), &slot, "walcast_rules").await;
    let json = |v: &str| serde_json::from_str::<serde_json::Value>(v).unwrap();

    for table in ["plain", "full_"] {
        client.execute(&format!("insert into public.{table} values (1, 'a', 'x')"), &[]).await.unwrap();
        let tx = p.next_tx().await;
        let c = changes(&tx)[0];
        assert_eq!((c.op, c.relation.table.as_str()), (Op::Insert, table));
        assert_eq!(c.record_json().unwrap(), json(r#"{"id":1,"v":"a","w":"x"}"#));
        assert_eq!(c.old_record_json(), None);

        client.execute(&format!("update public.{table} set v = 'b' where id = 1"), &[]).await.unwrap();
        let tx = p.next_tx().await;
        let c = changes(&tx)[0];
        assert_eq!(c.op, Op::Update);
        assert_eq!(c.record_json().unwrap(), json(r#"{"id":1,"v":"b","w":"x"}"#));
        let old = if table == "plain" { r#"{"id":1}"# } else { r#"{"id":1,"v":"a","w":"x"}"# };
        assert_eq!(c.old_record_json().unwrap(), json(old), "{table}: old_record");

        // Changing the key: DEFAULT identity sends the old key.
        client.execute(&format!("update public.{table} set id = 2 where id = 1"), &[]).await.unwrap();
        let tx = p.next_tx().await;
        let c = changes(&tx)[0];
        let old = if table == "plain" { r#"{"id":1}"# } else { r#"{"id":1,"v":"b","w":"x"}"# };
        assert_eq!(c.old_record_json().unwrap(), json(old), "{table}: old_record after key change");

        client.execute(&format!("delete from public.{table} where id = 2"), &[]).await.unwrap();
        let tx = p.next_tx().await;
        let c = changes(&tx)[0];
        assert_eq!(c.op, Op::Delete);
        assert_eq!(c.record_json(), None);
        let old = if table == "plain" { r#"{"id":2}"# } else { r#"{"id":2,"v":"b","w":"x"}"# };
        assert_eq!(c.old_record_json().unwrap(), json(old), "{table}: delete old_record");
    }

    client.execute("insert into public.plain values (5, 'p', 'q')", &[]).await.unwrap();
    p.next_tx().await;
    client.batch_execute("truncate public.plain, public.full_").await.unwrap();
    let tx = p.next_tx().await;
    let truncated: Vec<&str> =
        changes(&tx).iter().filter(|c| c.op == Op::Truncate).map(|c| c.relation.table.as_str()).collect();
    assert_eq!(truncated.len(), 2, "{truncated:?}");
}

#[tokio::test]
async fn transactions_group_changes_and_rollbacks_emit_nothing() {
    let (db, mut client) = migrated_db().await;
    client
        .batch_execute("create table public.t (id int primary key); create publication walcast_tx for table public.t;")
        .await
        .unwrap();
    let slot = format!("{}_s", db.name());
    let mut p = Pipeline::start(db.url(), &slot, "walcast_tx").await;

    let tx = client.transaction().await.unwrap();
    tx.execute("insert into public.t values (1)", &[]).await.unwrap();
    tx.execute("insert into public.t values (2)", &[]).await.unwrap();
    tx.execute("delete from public.t where id = 1", &[]).await.unwrap();
    tx.rollback().await.unwrap();

    let tx = client.transaction().await.unwrap();
    tx.execute("insert into public.t values (10)", &[]).await.unwrap();
    tx.execute("insert into public.t values (11)", &[]).await.unwrap();
    tx.execute("update public.t set id = 12 where id = 11", &[]).await.unwrap();
    tx.commit().await.unwrap();

    let events = p.next_tx().await;
    assert!(matches!(events.first(), Some(TxEvent::Begin(_))));
    let TxEvent::Commit(info) = events.last().unwrap() else { panic!("ends with Commit") };
    let TxEvent::Begin(begin) = events.first().unwrap() else { unreachable!() };
    assert_eq!(begin.commit_lsn, info.commit_lsn);
    assert!(info.end_lsn > info.commit_lsn);
    let ops: Vec<(Op, serde_json::Value)> =
        changes(&events).iter().map(|c| (c.op, c.record_json().unwrap()["id"].clone())).collect();
    assert_eq!(
        ops,
        vec![(Op::Insert, 10.into()), (Op::Insert, 11.into()), (Op::Update, 12.into())],
        "only the committed transaction, in statement order"
    );
    // Nothing else is pending: the rolled-back transaction produced no events.
    client.execute("insert into public.t values (99)", &[]).await.unwrap();
    let next = p.next_tx().await;
    assert_eq!(changes(&next)[0].record_json().unwrap()["id"], 99);
}

#[tokio::test]
async fn unchanged_toast_is_recovered_from_full_identity_and_never_nulled() {
    let (db, client) = migrated_db().await;
    client
        .batch_execute(
            "create table public.big_full (id int primary key, doc jsonb, n int);
             alter table public.big_full replica identity full;
             create table public.big_default (id int primary key, doc jsonb, n int);
             create publication walcast_toast for table public.big_full, public.big_default;",
        )
        .await
        .unwrap();
    let slot = format!("{}_s", db.name());
    let mut p = Pipeline::start(db.url(), &slot, "walcast_toast").await;
    // > 8 KiB of incompressible JSON, so it is stored out of line.
    let doc_sql = "(select jsonb_object_agg('k' || i, md5(i::text || random()::text)) from generate_series(1, 400) i)";
    for table in ["big_full", "big_default"] {
        client.execute(&format!("insert into public.{table} values (1, {doc_sql}, 0)"), &[]).await.unwrap();
        p.next_tx().await;
        client.execute(&format!("update public.{table} set n = 1 where id = 1"), &[]).await.unwrap();
        let tx = p.next_tx().await;
        let c = changes(&tx)[0];
        let record = c.record_json().unwrap();
        let stored: serde_json::Value =
            client.query_one(&format!("select doc from public.{table} where id = 1"), &[]).await.unwrap().get(0);
        assert!(stored.to_string().len() > 8192);
        if table == "big_full" {
            assert_eq!(record["doc"], stored, "recovered from the old row");
            assert!(c.missing_toast.is_empty());
        } else {
            assert!(record.get("doc").is_none(), "left out, never null: {record}");
            assert_eq!(c.missing_toast, vec!["doc".to_owned()]);
        }
        assert_eq!(record["n"], 1);
    }
}
