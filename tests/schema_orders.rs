//! Order numbering: per (dealership, type) counters under concurrency,
//! rolled-back savepoints, multi-statement transactions and multi-dealership
//! statements; immutability, and the `updated_at` trigger.

use std::collections::BTreeSet;

use futures::SinkExt;
use tokio_postgres::{Client, Transaction};
use uuid::Uuid;

use crate::support::{create_dealership, create_order, create_user, migrated_db, sqlstate, texts};

/// Inserts `n` orders of `kind` into `dealership` in one `INSERT … SELECT`;
/// returns their numbers in insertion order.
async fn insert_n(tx: &Transaction<'_>, dealership: Uuid, kind: &str, n: i32, user: Uuid) -> Vec<String> {
    tx.query(
        "insert into public.orders (dealership_id, type, customer_info, created_by) \
         select $1, $2, '{}', $3 from generate_series(1, $4) \
         returning order_number",
        &[&dealership, &kind, &user, &n],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// `prefix-000001`, … for the given counter values.
fn numbered(prefix: &str, values: impl IntoIterator<Item = u64>) -> Vec<String> {
    values.into_iter().map(|v| format!("{prefix}-{v:06}")).collect()
}

/// Every committed order number starting with `prefix-`, sorted.
async fn committed(client: &Client, prefix: &str) -> Vec<String> {
    client
        .query(
            "select order_number from public.orders where order_number like $1 || '-%' order by order_number",
            &[&prefix],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The counter row's value, if there is one.
async fn counter(client: &Client, dealership: Uuid, kind: &str) -> Option<i64> {
    client
        .query_opt(
            "select last_value from private.order_number_counters where dealership_id = $1 and type = $2",
            &[&dealership, &kind],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

#[tokio::test]
async fn concurrent_inserts_get_distinct_gap_free_numbers() {
    const CONNECTIONS: usize = 8;
    const INSERTS: usize = 250;
    let (db, client) = migrated_db().await;
    let north = create_dealership(&client, "NORTH").await;
    let south = create_dealership(&client, "SOUTH").await;
    let creator = create_user(&client, "creator@example.com").await;

    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let conn = db.connect().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let insert = conn
                .prepare(
                    "insert into public.orders (dealership_id, type, customer_info, created_by) \
                     values ($1, 'sales', '{\"name\": \"x\"}', $2) returning order_number",
                )
                .await
                .unwrap();
            let mut numbers = Vec::with_capacity(INSERTS);
            for _ in 0..INSERTS {
                let row = conn.query_one(&insert, &[&north, &creator]).await.unwrap();
                numbers.push(row.get::<_, String>(0));
            }
            numbers
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    assert_eq!(all.len(), CONNECTIONS * INSERTS);
    let distinct: BTreeSet<&String> = all.iter().collect();
    assert_eq!(distinct.len(), all.len(), "duplicate order numbers");
    let mut seq: Vec<u64> = all
        .iter()
        .map(|n| {
            let digits = n.strip_prefix("NORTH-SALES-").unwrap_or_else(|| panic!("malformed {n}"));
            assert_eq!(digits.len(), 6, "six digits: {n}");
            digits.parse().unwrap()
        })
        .collect();
    seq.sort_unstable();
    assert_eq!(seq, (1..=(CONNECTIONS * INSERTS) as u64).collect::<Vec<_>>(), "gap-free from 1");

    // Other dealerships and types count on their own.
    let number = |id| {
        let client = &client;
        async move {
            client
                .query_one("select order_number from public.orders where id = $1", &[&id])
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    let s1 = create_order(&client, north, creator, "service", "pending").await;
    let s2 = create_order(&client, north, creator, "service", "pending").await;
    let c1 = create_order(&client, south, creator, "sales", "draft").await;
    let w1 = create_order(&client, south, creator, "carwash", "draft").await;
    assert_eq!(number(s1).await, "NORTH-SERVICE-000001");
    assert_eq!(number(s2).await, "NORTH-SERVICE-000002");
    assert_eq!(number(c1).await, "SOUTH-SALES-000001");
    assert_eq!(number(w1).await, "SOUTH-CARWASH-000001");
}

#[tokio::test]
async fn numbers_are_immutable_and_given_numbers_are_kept() {
    let (_db, client) = migrated_db().await;
    let d = create_dealership(&client, "EAST").await;
    let u = create_user(&client, "u@example.com").await;
    let id = create_order(&client, d, u, "recon", "pending").await;
    let err = client
        .execute("update public.orders set order_number = 'EAST-RECON-999999' where id = $1", &[&id])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "23514", "{err}");
    assert!(
        err.to_string().contains("order_number cannot be changed")
            || format!("{err:?}").contains("order_number cannot be changed")
    );
    // Other updates still work, and bump updated_at.
    let before: std::time::SystemTime =
        client.query_one("select updated_at from public.orders where id = $1", &[&id]).await.unwrap().get(0);
    client.execute("update public.orders set status = 'in_progress' where id = $1", &[&id]).await.unwrap();
    let after: std::time::SystemTime =
        client.query_one("select updated_at from public.orders where id = $1", &[&id]).await.unwrap().get(0);
    assert!(after > before, "updated_at maintained by trigger");

    let given: String = client
        .query_one(
            "insert into public.orders (dealership_id, order_number, type, customer_info, created_by) \
             values ($1, 'IMPORTED-42', 'sales', '{}', $2) returning order_number",
            &[&d, &u],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(given, "IMPORTED-42");
}

#[tokio::test]
async fn constraints_reject_bad_values() {
    let (_db, client) = migrated_db().await;
    let d = create_dealership(&client, "WEST").await;
    let u = create_user(&client, "w@example.com").await;
    let insert = |kind: &'static str, status: &'static str, customer: &'static str| {
        let client = &client;
        async move {
            client
                .execute(
                    "insert into public.orders (dealership_id, type, status, customer_info, created_by) \
                     values ($1, $2, $3, $4::text::jsonb, $5)",
                    &[&d, &kind, &status, &customer, &u],
                )
                .await
        }
    };
    assert_eq!(sqlstate(&insert("lease", "pending", "{}").await.unwrap_err()), "23514");
    assert_eq!(sqlstate(&insert("sales", "shipped", "{}").await.unwrap_err()), "23514");
    assert_eq!(sqlstate(&insert("sales", "pending", "[]").await.unwrap_err()), "23514");
    let err = client
        .execute(
            "insert into public.orders (dealership_id, customer_info, created_by) values ($1, '{}', $2)",
            &[&d, &u],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "23502", "missing type: {err}");
    let err = client
        .execute(
            "insert into public.dealer_memberships (user_id, dealership_id, role) values ($1, $2, 'owner')",
            &[&u, &d],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "23514");
    let err =
        client.execute("insert into public.dealerships (name, code) values ('x', 'has-dash')", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "23514");
    // The default status is pending.
    assert_eq!(insert("sales", "pending", "{}").await.unwrap(), 1);
}

#[tokio::test]
async fn rolled_back_savepoints_leave_no_gap_and_reuse_no_committed_number() {
    let (_db, mut client) = migrated_db().await;
    let d = create_dealership(&client, "SAVE").await;
    let other = create_dealership(&client, "OTHER").await;
    let u = create_user(&client, "s@example.com").await;
    create_order(&client, d, u, "sales", "pending").await; // SAVE-SALES-000001, committed

    let tx = client.transaction().await.unwrap();
    let mut kept = insert_n(&tx, d, "sales", 2, u).await;
    assert_eq!(kept, numbered("SAVE-SALES", 2..=3));

    // A whole statement rolled back to a savepoint: its numbers are handed out again.
    tx.batch_execute("savepoint s1").await.unwrap();
    assert_eq!(insert_n(&tx, d, "sales", 3, u).await, numbered("SAVE-SALES", 4..=6));
    tx.batch_execute("rollback to savepoint s1").await.unwrap();
    kept.extend(insert_n(&tx, d, "sales", 1, u).await);

    // A statement failing half-way (the second row breaks the type CHECK).
    tx.batch_execute("savepoint s2").await.unwrap();
    let err = tx
        .execute(
            "insert into public.orders (dealership_id, type, customer_info, created_by) \
             values ($1, 'sales', '{}', $2), ($1, 'lease', '{}', $2)",
            &[&d, &u],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "23514", "{err}");
    tx.batch_execute("rollback to savepoint s2").await.unwrap();
    kept.extend(insert_n(&tx, d, "sales", 1, u).await);

    // The first number of a key (which takes the counter's lock) rolled back.
    tx.batch_execute("savepoint s3").await.unwrap();
    assert_eq!(insert_n(&tx, other, "sales", 2, u).await, numbered("OTHER-SALES", 1..=2));
    tx.batch_execute("rollback to savepoint s3").await.unwrap();
    assert_eq!(insert_n(&tx, other, "sales", 1, u).await, numbered("OTHER-SALES", [1]));

    // A PL/pgSQL exception block is a subtransaction too.
    tx.batch_execute(&format!(
        "do $$ begin
             begin
                 insert into public.orders (dealership_id, type, customer_info, created_by)
                 select '{d}', 'sales', '{{}}', '{u}' from generate_series(1, 4);
                 raise exception 'undo';
             exception when raise_exception then null;
             end;
         end $$"
    ))
    .await
    .unwrap();

    // A released savepoint keeps its numbers.
    tx.batch_execute("savepoint s4").await.unwrap();
    kept.extend(insert_n(&tx, d, "sales", 2, u).await);
    tx.batch_execute("release savepoint s4").await.unwrap();
    kept.extend(insert_n(&tx, d, "sales", 1, u).await);
    assert_eq!(kept, numbered("SAVE-SALES", 2..=8));
    tx.commit().await.unwrap();
    assert_eq!(counter(&client, d, "sales").await, Some(8));
    assert_eq!(counter(&client, other, "sales").await, Some(1));

    // A rolled-back transaction (with a rolled-back savepoint inside) gives
    // nothing away, and nothing committed is handed out again.
    let tx = client.transaction().await.unwrap();
    tx.batch_execute("savepoint s5").await.unwrap();
    assert_eq!(insert_n(&tx, d, "sales", 2, u).await, numbered("SAVE-SALES", 9..=10));
    tx.batch_execute("rollback to savepoint s5").await.unwrap();
    assert_eq!(insert_n(&tx, d, "sales", 1, u).await, numbered("SAVE-SALES", [9]));
    tx.rollback().await.unwrap();
    create_order(&client, d, u, "sales", "pending").await;

    assert_eq!(committed(&client, "SAVE-SALES").await, numbered("SAVE-SALES", 1..=9));
    assert_eq!(committed(&client, "OTHER-SALES").await, numbered("OTHER-SALES", [1]));
    assert_eq!(counter(&client, d, "sales").await, Some(9));
}

#[tokio::test]
async fn a_multi_statement_transaction_numbers_on_from_statement_to_statement() {
    let (_db, mut client) = migrated_db().await;
    let d = create_dealership(&client, "MULTI").await;
    let u = create_user(&client, "m@example.com").await;
    create_order(&client, d, u, "service", "pending").await; // MULTI-SERVICE-000001

    let tx = client.transaction().await.unwrap();
    let mut numbers = insert_n(&tx, d, "service", 1, u).await;
    numbers.extend(insert_n(&tx, d, "service", 3, u).await);
    // A caller's own number is kept and takes no number from the counter.
    let given: String = tx
        .query_one(
            "insert into public.orders (dealership_id, order_number, type, customer_info, created_by) \
             values ($1, 'IMPORTED-7', 'service', '{}', $2) returning order_number",
            &[&d, &u],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(given, "IMPORTED-7");
    // COPY numbers like INSERT.
    let sink =
        tx.copy_in("copy public.orders (dealership_id, type, customer_info, created_by) from stdin").await.unwrap();
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from(format!("{d}\tservice\t{{}}\t{u}\n{d}\tservice\t{{}}\t{u}\n"))).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 2);
    // A data-modifying CTE and its outer INSERT in one statement.
    let rows = tx
        .query(
            "with first as ( \
                 insert into public.orders (dealership_id, type, customer_info, created_by) \
                 values ($1, 'service', '{}', $2) returning order_number) \
             insert into public.orders (dealership_id, type, customer_info, created_by) \
             select $1, 'service', '{}', $2 from first returning order_number",
            &[&d, &u],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    numbers.extend(insert_n(&tx, d, "service", 1, u).await);
    assert_eq!(numbers, numbered("MULTI-SERVICE", [2, 3, 4, 5, 10]));
    tx.commit().await.unwrap();

    assert_eq!(committed(&client, "MULTI-SERVICE").await, numbered("MULTI-SERVICE", 1..=10));
    assert_eq!(counter(&client, d, "service").await, Some(10));
    assert_eq!(create_order_number(&client, d, u, "service").await, "MULTI-SERVICE-000011");
}

#[tokio::test]
async fn hundreds_of_statements_in_one_transaction_number_on_across_counter_pages() {
    let (_db, mut client) = migrated_db().await;
    let d = create_dealership(&client, "PAGES").await;
    let u = create_user(&client, "p@example.com").await;
    let tx = client.transaction().await.unwrap();
    // 300 single-row statements; every 50th iteration also two orders in an
    // exception block that is rolled back.
    tx.batch_execute(&format!(
        "do $$ begin
             for i in 1..300 loop
                 if i % 50 = 0 then
                     begin
                         insert into public.orders (dealership_id, type, customer_info, created_by)
                         values ('{d}', 'recon', '{{}}', '{u}'), ('{d}', 'recon', '{{}}', '{u}');
                         raise exception 'undo';
                     exception when raise_exception then null;
                     end;
                 end if;
                 insert into public.orders (dealership_id, type, customer_info, created_by)
                 values ('{d}', 'recon', '{{}}', '{u}');
             end loop;
         end $$"
    ))
    .await
    .unwrap();
    // The counter row's versions of this transaction outgrew its first page,
    // so the statement-end writes followed the row across pages.
    let block: f64 = tx
        .query_one("select (ctid::text::point)[0] from private.order_number_counters where dealership_id = $1", &[&d])
        .await
        .unwrap()
        .get(0);
    assert!(block > 0.0, "the counter row is still on page {block}");
    tx.commit().await.unwrap();
    assert_eq!(committed(&client, "PAGES-RECON").await, numbered("PAGES-RECON", 1..=300));
    assert_eq!(counter(&client, d, "recon").await, Some(300));
}

/// Inserts one order and returns its number.
async fn create_order_number(client: &Client, dealership: Uuid, user: Uuid, kind: &str) -> String {
    let id = create_order(client, dealership, user, kind, "pending").await;
    client.query_one("select order_number from public.orders where id = $1", &[&id]).await.unwrap().get(0)
}

#[tokio::test]
async fn one_statement_numbers_several_dealerships_and_types() {
    let (_db, client) = migrated_db().await;
    let a = create_dealership(&client, "ALPHA").await;
    let b = create_dealership(&client, "BETA").await;
    let u = create_user(&client, "d@example.com").await;
    create_order(&client, b, u, "sales", "pending").await; // BETA-SALES-000001

    let values = |rows: &[(Uuid, &str)]| {
        rows.iter()
            .map(|(d, kind)| format!("('{d}'::uuid, '{kind}', '{{}}'::jsonb, '{u}'::uuid)"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let insert = |rows: String| {
        let client = &client;
        async move {
            client
                .query(
                    &format!(
                        "insert into public.orders (dealership_id, type, customer_info, created_by) \
                         values {rows} returning order_number"
                    ),
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        }
    };
    let got = insert(values(&[
        (a, "sales"),
        (b, "sales"),
        (a, "service"),
        (a, "sales"),
        (b, "sales"),
        (b, "carwash"),
        (a, "sales"),
    ]))
    .await;
    assert_eq!(
        got,
        [
            "ALPHA-SALES-000001",
            "BETA-SALES-000002",
            "ALPHA-SERVICE-000001",
            "ALPHA-SALES-000002",
            "BETA-SALES-000003",
            "BETA-CARWASH-000001",
            "ALPHA-SALES-000003",
        ]
    );
    assert_eq!(insert(values(&[(b, "sales"), (a, "sales")])).await, ["BETA-SALES-000004", "ALPHA-SALES-000004"]);

    // 1,000 rows over two dealerships and two types, interleaved.
    client
        .execute(
            "insert into public.orders (dealership_id, type, customer_info, created_by) \
             select case when g % 2 = 0 then $1::uuid else $2::uuid end, \
                    case when g % 4 < 2 then 'recon' else 'carwash' end, '{}', $3 \
             from generate_series(0, 999) g",
            &[&a, &b, &u],
        )
        .await
        .unwrap();
    assert_eq!(committed(&client, "ALPHA-RECON").await, numbered("ALPHA-RECON", 1..=250));
    assert_eq!(committed(&client, "ALPHA-CARWASH").await, numbered("ALPHA-CARWASH", 1..=250));
    assert_eq!(committed(&client, "BETA-RECON").await, numbered("BETA-RECON", 1..=250));
    assert_eq!(committed(&client, "BETA-CARWASH").await, numbered("BETA-CARWASH", 1..=251));
    for (d, kind, last) in [
        (a, "sales", 4),
        (a, "service", 1),
        (a, "recon", 250),
        (b, "sales", 4),
        (b, "carwash", 251),
        (a, "carwash", 250),
    ] {
        assert_eq!(counter(&client, d, kind).await, Some(last), "{kind}");
    }
}

#[tokio::test]
async fn concurrent_bulk_transactions_with_rolled_back_savepoints_stay_gap_free() {
    const CONNECTIONS: usize = 4;
    const TRANSACTIONS: i32 = 20;
    let (db, client) = migrated_db().await;
    let d = create_dealership(&client, "BULK").await;
    let u = create_user(&client, "b@example.com").await;

    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let mut conn = db.connect().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut kept = Vec::new();
            for t in 0..TRANSACTIONS {
                let tx = conn.transaction().await.unwrap();
                let mine = insert_n(&tx, d, "recon", 1 + (t % 3), u).await;
                tx.batch_execute("savepoint s").await.unwrap();
                insert_n(&tx, d, "recon", 2, u).await;
                tx.batch_execute("rollback to savepoint s").await.unwrap();
                let more = insert_n(&tx, d, "recon", 1 + ((t + c as i32) % 4), u).await;
                if t % 5 == 4 {
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                    kept.extend(mine);
                    kept.extend(more);
                }
            }
            kept
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let distinct: BTreeSet<&String> = all.iter().collect();
    assert_eq!(distinct.len(), all.len(), "duplicate order numbers");
    all.sort();
    assert_eq!(all, numbered("BULK-RECON", 1..=all.len() as u64), "gap-free from 1");
    assert_eq!(committed(&client, "BULK-RECON").await, all);
    assert_eq!(counter(&client, d, "recon").await, Some(all.len() as i64));
}

#[tokio::test]
async fn repeatable_read_transactions_that_collide_fail_to_serialize() {
    let (db, client) = migrated_db().await;
    let d = create_dealership(&client, "RR").await;
    let u = create_user(&client, "r@example.com").await;
    create_order(&client, d, u, "sales", "pending").await; // RR-SALES-000001
    let first = db.connect().await.unwrap();
    let second = db.connect().await.unwrap();
    let insert = "insert into public.orders (dealership_id, type, customer_info, created_by) \
                  values ($1, 'sales', '{}', $2) returning order_number";

    first.batch_execute("begin isolation level repeatable read").await.unwrap();
    second.batch_execute("begin isolation level repeatable read; select 1").await.unwrap(); // snapshot taken
    let n: String = first.query_one(insert, &[&d, &u]).await.unwrap().get(0);
    assert_eq!(n, "RR-SALES-000002");
    first.batch_execute("commit").await.unwrap();
    let err = second.query_one(insert, &[&d, &u]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "40001", "{err}");
    second.batch_execute("rollback").await.unwrap();
    // Retried, it gets the next number.
    let n: String = second.query_one(insert, &[&d, &u]).await.unwrap().get(0);
    assert_eq!(n, "RR-SALES-000003");
}

#[tokio::test]
async fn a_forged_counter_setting_cannot_duplicate_or_skip_numbers() {
    let (_db, mut client) = migrated_db().await;
    let d = create_dealership(&client, "FORGE").await;
    let u = create_user(&client, "f@example.com").await;
    for _ in 0..3 {
        create_order(&client, d, u, "sales", "pending").await;
    }
    let setting = format!("walcast_order_number.d{}_{}", d.simple(), "73616c6573"); // "sales" in hex
    for (forged, expected) in [("1:1:(0,1)", "23505"), ("50:50:(0,1)", "XX000"), ("garbage", "22P02")] {
        let tx = client.transaction().await.unwrap();
        tx.execute("select set_config($1, $2, true)", &[&setting, &forged]).await.unwrap();
        let err = tx
            .execute(
                "insert into public.orders (dealership_id, type, customer_info, created_by) values ($1, 'sales', '{}', $2)",
                &[&d, &u],
            )
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&err), expected, "forged {forged}: {err}");
        tx.rollback().await.unwrap();
    }
    assert_eq!(counter(&client, d, "sales").await, Some(3));
    assert_eq!(create_order_number(&client, d, u, "sales").await, "FORGE-SALES-000004");
}

/// The search document (sql/0008) has no SET clause, so PostgreSQL inlines it
/// into the index expression and into queries; it names everything by schema,
/// so a hostile `search_path` cannot change what it computes; and a search
/// with the same call finds the order through `orders_search_idx`.
#[tokio::test]
async fn the_search_document_is_inlined_search_path_proof_and_indexed() {
    let (_db, client) = migrated_db().await;
    let proconfig: Option<Vec<String>> = client
        .query_one(
            "select proconfig from pg_proc where oid = 'public.order_search_document(text, jsonb, jsonb)'::regprocedure",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(proconfig, None, "a SET clause would stop the inlining");

    // Inlined: the plan shows the body, not a call of the function.
    let plan = texts(
        &client,
        "explain (verbose, costs off) select public.order_search_document(order_number, customer_info, vehicle_info) from public.orders",
    )
    .await
    .join("\n");
    assert!(plan.contains("to_tsvector") && !plan.contains("order_search_document"), "{plan}");

    let user = create_user(&client, "search@example.com").await;
    let dealership = create_dealership(&client, "SRCH").await;
    client
        .execute(
            "insert into public.orders (dealership_id, type, customer_info, vehicle_info, created_by) \
             values ($1, 'sales', '{\"name\": \"Ada Lovelace\"}', '{\"vin\": \"WVWZZZ1JZXW000001\"}', $2)",
            &[&dealership, &user],
        )
        .await
        .unwrap();
    let expected = search_document(&client).await;
    for word in ["'ada'", "'lovelace'", "'wvwzzz1jzxw000001'"] {
        assert!(expected.contains(word), "{word} in {expected}");
    }

    // A schema ahead of pg_catalog with its own `||` and `->>` on the same
    // types, and its own text search configuration named `simple`: the
    // document does not change.
    client
        .batch_execute(
            "create schema hostile; \
             create function hostile.cat(text, text) returns text language sql immutable as $$ select 'x' $$; \
             create operator hostile.|| (leftarg = text, rightarg = text, function = hostile.cat); \
             create function hostile.field(jsonb, text) returns text language sql immutable as $$ select 'y' $$; \
             create operator hostile.->> (leftarg = jsonb, rightarg = text, function = hostile.field); \
             create text search configuration hostile.simple (copy = pg_catalog.english); \
             set search_path = hostile, pg_catalog, public;",
        )
        .await
        .unwrap();
    assert_eq!(
        client.query_one("select 'a' || 'b'", &[]).await.unwrap().get::<_, String>(0),
        "x",
        "the hostile operator is live"
    );
    assert_eq!(search_document(&client).await, expected);
    client.batch_execute("reset search_path; set enable_seqscan = off;").await.unwrap();

    // A search with the same call uses the index and finds the order.
    let search = "select count(*) from public.orders \
                  where public.order_search_document(order_number, customer_info, vehicle_info) \
                        @@ websearch_to_tsquery('simple', 'lovelace WVWZZZ1JZXW000001')";
    let plan = texts(&client, &format!("explain (costs off) {search}")).await;
    assert!(plan.join("\n").contains("orders_search_idx"), "{plan:?}");
    assert_eq!(client.query_one(search, &[]).await.unwrap().get::<_, i64>(0), 1);
}

/// The search document of the only order.
async fn search_document(client: &Client) -> String {
    client
        .query_one(
            "select public.order_search_document(order_number, customer_info, vehicle_info)::text from public.orders",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}
