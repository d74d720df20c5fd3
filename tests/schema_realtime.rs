//! The realtime publication, replica identity, the monitoring queries, and the
//! plans behind the policies and dashboards.

use std::path::Path;

use crate::support::{create_dealership, create_user, migrated_db, query_as, texts, Who};

#[tokio::test]
async fn publication_holds_both_tables_with_full_identity() {
    let (_db, client) = migrated_db().await;
    let tables = texts(
        &client,
        "select schemaname || '.' || tablename from pg_publication_tables \
         where pubname = 'supabase_realtime' order by 1",
    )
    .await;
    assert_eq!(tables, ["public.dealer_memberships", "public.orders"]);
    let identities: Vec<(String, i8)> = client
        .query(
            "select relname::text, relreplident::\"char\" from pg_class \
             where oid in ('public.orders'::regclass, 'public.dealer_memberships'::regclass) order by 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(identities, [("dealer_memberships".to_owned(), b'f' as i8), ("orders".to_owned(), b'f' as i8)]);
    let actions: (bool, bool, bool, bool) = client
        .query_one(
            "select pubinsert, pubupdate, pubdelete, pubtruncate from pg_publication where pubname = 'supabase_realtime'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .unwrap();
    assert_eq!(actions, (true, true, true, true));
}

fn monitoring_queries() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/monitoring");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap()))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "monitoring queries: {files:?}");
    files
}

#[tokio::test]
async fn monitoring_queries_run_with_and_without_pg_stat_statements() {
    let (db, client) = migrated_db().await;
    // A slot and some activity, so the slot and index queries return rows.
    client
        .query_one(&format!("select pg_create_logical_replication_slot('{}_slot', 'pgoutput')", db.name()), &[])
        .await
        .unwrap();
    let d = create_dealership(&client, "MON").await;
    let u = create_user(&client, "mon@example.com").await;
    client
        .execute(
            "insert into public.orders (dealership_id, type, customer_info, created_by) values ($1, 'sales', '{}', $2)",
            &[&d, &u],
        )
        .await
        .unwrap();

    let slot_name = format!("{}_slot", db.name());
    let run_all = |expect_statements: bool| {
        let client = &client;
        let slot_name = &slot_name;
        async move {
            for (name, sql) in monitoring_queries() {
                let rows = client.simple_query(&sql).await.unwrap_or_else(|e| panic!("{name} failed: {e:?}"));
                let data: Vec<_> = rows
                    .iter()
                    .filter_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                        _ => None,
                    })
                    .collect();
                match name.as_str() {
                    "slowest_statements.sql" => {
                        assert!(!data.is_empty(), "{name}: no rows");
                        let note = data[0].get("note");
                        if expect_statements {
                            assert_eq!(note, None, "{name}: {note:?}");
                            assert!(data.iter().any(|r| r.get("query").is_some()), "{name}: no statements");
                        } else {
                            assert!(note.is_some_and(|n| n.contains("pg_stat_statements")), "{name}: {note:?}");
                        }
                    }
                    "replication_slots.sql" => {
                        assert!(
                            data.iter().any(|r| r.get("slot_name") == Some(slot_name.as_str())),
                            "{name}: our slot is listed"
                        );
                    }
                    "index_usage.sql" | "unused_indexes.sql" | "table_sizes.sql" => {
                        assert!(!data.is_empty(), "{name}: no rows");
                    }
                    other => panic!("unexpected monitoring file {other}: give it an assertion here"),
                }
            }
        }
    };
    run_all(false).await;

    let loaded: String = client.query_one("show shared_preload_libraries", &[]).await.unwrap().get(0);
    if loaded.contains("pg_stat_statements") {
        client.batch_execute("create extension pg_stat_statements").await.unwrap();
        run_all(true).await;
    } else {
        // An external TEST_DATABASE_URL server without the library loaded:
        // the query must say so rather than fail.
        client.batch_execute("create extension pg_stat_statements").await.unwrap();
        run_all(false).await;
    }
    client.execute(&format!("select pg_drop_replication_slot('{}_slot')", db.name()), &[]).await.unwrap();
}

/// Every index name in an EXPLAIN (FORMAT JSON) plan.
fn plan_indexes(plan: &serde_json::Value, out: &mut Vec<String>) {
    match plan {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::String(name)) = map.get("Index Name") {
                out.push(name.clone());
            }
            map.values().for_each(|v| plan_indexes(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| plan_indexes(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn plans_use_the_indexes() {
    let (_db, mut client) = migrated_db().await;
    // 200 dealerships × 50 orders, 2,000 users with 3 memberships each.
    client
        .batch_execute(
            "insert into public.dealerships (name, code) select 'D' || i, 'D' || i from generate_series(1, 200) i;
             insert into auth.users (id, email) select gen_random_uuid(), 'u' || i || '@x' from generate_series(1, 2000) i;
             insert into public.profiles (id, email) select id, email from auth.users;
             insert into public.dealer_memberships (user_id, dealership_id, role)
                 select u.id, d.id, (array['admin', 'manager', 'user'])[1 + (k % 3)]
                 from (select id, row_number() over (order by id) as n from public.profiles) u
                 cross join generate_series(0, 2) k
                 join (select id, row_number() over (order by id) as n from public.dealerships) d
                   on d.n = 1 + ((u.n * 7 + k * 61) % 200);
             insert into public.orders (dealership_id, type, status, customer_info, created_by)
                 select d.id, (array['sales', 'service', 'recon', 'carwash'])[1 + (i % 4)],
                        (array['draft', 'pending', 'in_progress', 'completed', 'cancelled'])[1 + (i % 5)],
                        jsonb_build_object('name', 'Customer ' || i), (select id from public.profiles limit 1)
                 from public.dealerships d cross join generate_series(1, 50) i;
             analyze;",
        )
        .await
        .unwrap();
    let dealership: uuid::Uuid =
        client.query_one("select id from public.dealerships limit 1", &[]).await.unwrap().get(0);
    let explain = |sql: String| {
        let client = &client;
        async move {
            let plan: serde_json::Value =
                client.query_one(&format!("explain (format json) {sql}"), &[]).await.unwrap().get(0);
            let mut names = Vec::new();
            plan_indexes(&plan, &mut names);
            (names, plan)
        }
    };
    let (names, plan) =
        explain(format!("select * from public.orders where dealership_id = '{dealership}' and status = 'pending'"))
            .await;
    assert!(names.iter().any(|n| n == "orders_dealership_status_idx"), "{plan}");

    let member: uuid::Uuid =
        client.query_one("select user_id from public.dealer_memberships limit 1", &[]).await.unwrap().get(0);
    let (names, plan) =
        explain(format!("select dealership_id, role from public.dealer_memberships where user_id = '{member}'")).await;
    assert!(names.iter().any(|n| n == "dealer_memberships_user_dealership_key"), "{plan}");

    // The same query as a member, through RLS: the policy's membership
    // subquery does not stop the orders index from being used.
    let rows = query_as(
        &mut client,
        Who::User(member),
        &format!("explain (format json) select * from public.orders where dealership_id = '{dealership}' and status = 'pending'"),
        &[],
    )
    .await
    .unwrap();
    let plan: serde_json::Value = rows[0].get(0);
    let mut names = Vec::new();
    plan_indexes(&plan, &mut names);
    assert!(names.iter().any(|n| n == "orders_dealership_status_idx"), "{plan}");
}
