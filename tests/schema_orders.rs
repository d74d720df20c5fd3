//! Order numbering: per (dealership, type) counters under concurrency,
//! immutability, and the `updated_at` trigger.

use std::collections::BTreeSet;

use crate::support::{create_dealership, create_order, create_user, migrated_db, sqlstate};

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
