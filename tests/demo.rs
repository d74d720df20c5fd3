//! The one-command demo: idempotent seed, demo tokens, the writer, and
//! `demo::start` on a kept data directory.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use tokio_postgres::Client;
use uuid::Uuid;
use walcast::demo::{self, DemoConfig, DemoInfo, Writer, WriterStep, MAX_ORDERS, MIN_ORDERS};

use crate::support::{migrated_db, query_as, Who};

/// The fixed ids, read from the (pure) token builder.
fn ids() -> DemoInfo {
    demo::demo_info(b"unused", 0)
}

fn user_id(info: &DemoInfo, name: &str) -> Uuid {
    info.users.iter().find(|u| u.name == name).unwrap_or_else(|| panic!("demo user {name}")).id
}

fn dealership_id(info: &DemoInfo, code: &str) -> Uuid {
    info.dealerships.iter().find(|d| d.code == code).unwrap_or_else(|| panic!("dealership {code}")).id
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Order id → order number.
async fn orders(client: &Client) -> BTreeMap<Uuid, String> {
    client
        .query("select id, order_number from public.orders", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn seed_twice_loads_once() {
    let (_db, mut client) = migrated_db().await;
    let info = ids();
    demo::seed(&mut client).await.unwrap();
    let first = orders(&client).await;
    demo::seed(&mut client).await.unwrap();

    assert_eq!(count(&client, "select count(*) from public.dealerships").await, 3);
    assert_eq!(count(&client, "select count(*) from auth.users").await, 4);
    assert_eq!(count(&client, "select count(*) from public.profiles").await, 4);
    assert_eq!(count(&client, "select count(*) from public.dealer_memberships").await, 4);
    assert_eq!(orders(&client).await, first, "the second seed adds no orders");
    assert_eq!(first.len(), 10);
    let numbers: BTreeSet<&String> = first.values().collect();
    assert_eq!(numbers.len(), 10);
    for n in &numbers {
        let code = n.split('-').next().unwrap();
        assert!(["NORTH", "SOUTH", "EAST"].contains(&code), "{n}");
    }

    // Memberships as designed.
    let memberships: BTreeSet<(Uuid, Uuid, String)> = client
        .query("select user_id, dealership_id, role from public.dealer_memberships", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let (alice, bob, carol) = (user_id(&info, "alice"), user_id(&info, "bob"), user_id(&info, "carol"));
    let (north, south, east) =
        (dealership_id(&info, "NORTH"), dealership_id(&info, "SOUTH"), dealership_id(&info, "EAST"));
    let expected: BTreeSet<(Uuid, Uuid, String)> =
        [(alice, north, "admin"), (alice, south, "user"), (bob, north, "user"), (carol, east, "manager")]
            .into_iter()
            .map(|(u, d, r)| (u, d, r.to_owned()))
            .collect();
    assert_eq!(memberships, expected);

    // What each user sees through RLS follows from those memberships.
    for (name, seen) in [("alice", 7), ("bob", 4), ("carol", 3), ("dave", 0)] {
        let who = Who::User(user_id(&info, name));
        let rows = query_as(&mut client, who, "select count(*) from public.orders", &[]).await.unwrap();
        assert_eq!(rows[0].get::<_, i64>(0), seen, "{name}");
    }

    // Orders the writer deleted do not come back on a restart.
    client.execute("delete from public.orders where status = 'completed'", &[]).await.unwrap();
    let left = orders(&client).await;
    assert!(left.len() < 10);
    demo::seed(&mut client).await.unwrap();
    assert_eq!(orders(&client).await, left);
}

#[tokio::test]
async fn demo_tokens_carry_the_right_claims() {
    let secret = "ab".repeat(32);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let info = demo::demo_info(secret.as_bytes(), now);
    let key = DecodingKey::from_secret(secret.as_bytes());
    let claims = |token: &str, aud: Option<&str>| -> serde_json::Value {
        let mut validation = Validation::new(Algorithm::HS256);
        match aud {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        decode::<serde_json::Value>(token, &key, &validation).expect("valid token").claims
    };
    let thirty_days = 30 * 24 * 60 * 60;

    let anon = claims(&info.anon_key, None);
    assert_eq!(anon["role"], "anon");
    assert_eq!(anon["iat"], now);
    assert_eq!(anon["exp"], now + thirty_days);
    assert!(anon.get("sub").is_none());
    let service = claims(&info.service_role_key, None);
    assert_eq!(service["role"], "service_role");
    assert_eq!(service["exp"], now + thirty_days);

    assert_eq!(info.users.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(), ["alice", "bob", "carol", "dave"]);
    for user in &info.users {
        let c = claims(&user.token, Some("authenticated"));
        assert_eq!(c["role"], "authenticated");
        assert_eq!(c["aud"], "authenticated");
        assert_eq!(c["sub"], user.id.to_string());
        assert_eq!(c["email"], user.email);
        assert_eq!(c["exp"], now + thirty_days);
    }
    let codes = |name: &str| -> Vec<&str> {
        let user = info.users.iter().find(|u| u.name == name).unwrap();
        user.dealerships.iter().map(|id| info.dealerships.iter().find(|d| d.id == *id).unwrap().code.as_str()).collect()
    };
    assert_eq!(codes("alice"), ["NORTH", "SOUTH"]);
    assert_eq!(codes("bob"), ["NORTH"]);
    assert_eq!(codes("carol"), ["EAST"]);
    assert!(codes("dave").is_empty());
    assert_eq!(info.users[0].description, "admin of NORTH, user of SOUTH");

    // Another secret does not verify them; the ids do not depend on time or secret.
    let other = DecodingKey::from_secret(b"another secret");
    assert!(decode::<serde_json::Value>(&info.anon_key, &other, &Validation::new(Algorithm::HS256)).is_err());
    assert_eq!(ids().users[1].id, info.users[1].id);

    // The JSON the dashboard reads.
    let json = serde_json::to_value(&info).unwrap();
    for key in ["anon_key", "service_role_key", "users", "dealerships"] {
        assert!(json.get(key).is_some(), "{key}");
    }
    for key in ["name", "email", "id", "token", "dealerships", "description"] {
        assert!(json["users"][0].get(key).is_some(), "{key}");
    }
}

#[tokio::test]
async fn writer_keeps_orders_moving_within_bounds() {
    let (db, mut client) = migrated_db().await;
    demo::seed(&mut client).await.unwrap();
    let mut writer = Writer::connect(db.url(), 42).await.unwrap();
    let mut kinds = BTreeMap::<&str, usize>::new();
    for i in 0..40 {
        let step = writer.step().await.unwrap_or_else(|e| panic!("step {i}: {e}"));
        *kinds.entry(step.kind()).or_default() += 1;
        if let WriterStep::StatusChanged { from, to, .. } = &step {
            let allowed = matches!(
                (from.as_str(), to.as_str()),
                ("draft", "pending")
                    | ("pending", "in_progress")
                    | ("in_progress", "completed")
                    | ("draft" | "pending" | "in_progress", "cancelled")
            );
            assert!(allowed, "{from} -> {to}");
        }
        let n = writer.order_count().await.unwrap();
        assert!((1..=MAX_ORDERS).contains(&n), "step {i}: {n} orders");
    }
    assert!(kinds.get("insert").copied().unwrap_or(0) > 0, "{kinds:?}");
    assert!(kinds.get("status").copied().unwrap_or(0) > 0, "{kinds:?}");
    assert!(kinds.get("delete").copied().unwrap_or(0) > 0, "{kinds:?}");
    assert_eq!(kinds.get("idle"), None, "{kinds:?}");
    let numbers = orders(&client).await;
    assert_eq!(numbers.values().collect::<BTreeSet<_>>().len(), numbers.len());

    // The same seed on the same data makes the same steps.
    let (db2, mut client2) = migrated_db().await;
    demo::seed(&mut client2).await.unwrap();
    let mut a = Writer::connect(db2.url(), 7).await.unwrap();
    let (db3, mut client3) = migrated_db().await;
    demo::seed(&mut client3).await.unwrap();
    let mut b = Writer::connect(db3.url(), 7).await.unwrap();
    for _ in 0..10 {
        let (sa, sb) = (a.step().await.unwrap(), b.step().await.unwrap());
        assert_eq!(sa.kind(), sb.kind());
    }

    // At the upper bound it deletes; below the lower bound it inserts.
    let north = dealership_id(&ids(), "NORTH");
    let bob = user_id(&ids(), "bob");
    let missing = MAX_ORDERS - writer.order_count().await.unwrap();
    client
        .execute(
            "insert into public.orders (dealership_id, type, customer_info, created_by) \
             select $1, 'sales', '{\"name\": \"Filler\"}', $2 from generate_series(1, $3::int8)",
            &[&north, &bob, &missing],
        )
        .await
        .unwrap();
    assert_eq!(writer.order_count().await.unwrap(), MAX_ORDERS);
    assert!(matches!(writer.step().await.unwrap(), WriterStep::Deleted { .. }));
    assert_eq!(writer.order_count().await.unwrap(), MAX_ORDERS - 1);
    client
        .execute(
            "delete from public.orders where id not in (select id from public.orders limit $1)",
            &[&(MIN_ORDERS - 1)],
        )
        .await
        .unwrap();
    assert_eq!(writer.order_count().await.unwrap(), MIN_ORDERS - 1);
    assert!(matches!(writer.step().await.unwrap(), WriterStep::Inserted { .. }));
}

#[tokio::test]
async fn run_writer_writes_until_shutdown() {
    let (db, mut client) = migrated_db().await;
    demo::seed(&mut client).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(demo::run_writer(db.url().to_owned(), Duration::from_millis(20), stop.clone()));
    let changed = "select count(*) from public.orders where updated_at > now() - interval '1 minute'";
    tokio::time::timeout(Duration::from_secs(20), async {
        while count(&client, changed).await < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the writer changes orders");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("the writer stops").unwrap();
}

#[tokio::test]
async fn start_twice_reuses_cluster_data_and_secret() {
    let dir = tempfile::tempdir().unwrap();
    let config = DemoConfig { data_dir: dir.path().join("demo"), writer_interval: None, fetch: false };

    let first = demo::start(&config).await.unwrap();
    let secret_path = config.data_dir.join(demo::SECRET_FILE);
    assert_eq!(std::fs::metadata(&secret_path).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(&secret_path).unwrap().trim(), first.jwt_secret);
    assert_eq!(first.info.users.len(), 4);
    let client = walcast_connect(&first.database_url).await;
    let before = orders(&client).await;
    assert_eq!(before.len(), 10);
    let migrations = count(&client, "select count(*) from walcast.schema_migrations").await;
    drop(client);
    let secret = first.jwt_secret.clone();
    let anon_key = first.info.anon_key.clone();
    first.stop().await.unwrap();

    let second = demo::start(&config).await.unwrap();
    assert_eq!(second.jwt_secret, secret, "the secret is reused");
    let mut validation = Validation::new(Algorithm::HS256);
    validation.validate_aud = false;
    decode::<serde_json::Value>(&anon_key, &DecodingKey::from_secret(second.jwt_secret.as_bytes()), &validation)
        .expect("tokens of the first start stay valid");
    let client = walcast_connect(&second.database_url).await;
    assert_eq!(orders(&client).await, before, "data kept, seed not repeated");
    assert_eq!(count(&client, "select count(*) from walcast.schema_migrations").await, migrations);
    assert_eq!(count(&client, "select count(*) from public.dealerships").await, 3);
    drop(client);
    second.stop().await.unwrap();
    assert!(!config.data_dir.join("data/postmaster.pid").exists(), "the cluster is stopped");
}

async fn walcast_connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

#[test]
fn dashboard_is_self_contained() {
    let html = include_str!("../src/http/dashboard.html");
    // Small enough to read in one sitting: the board, its merge of the read with live changes,
    // the health strip, the viewed dealership's Presence list and pings, and a Phoenix client.
    assert!(html.lines().count() < 900);
    for external in ["http://", "https://", "//cdn", "src=\"", "@import", "url("] {
        assert!(!html.contains(external), "the dashboard must not load {external}");
    }
    // Text from the wire is inserted with textContent only.
    assert!(!html.contains("innerHTML") && !html.contains("insertAdjacentHTML") && !html.contains("document.write"));
    // What a headless-browser test waits on.
    for hook in [
        "data-status=\"connecting\"",
        "data-order-count=\"0\"",
        "dataset.orderNumber",
        "dataset.synced",
        "id=\"board\"",
        "id=\"log\"",
        "id=\"health\"",
        "id=\"dealership\"",
        "id=\"viewers\"",
        "id=\"ping\"",
        "dataset.viewerCount",
        "dataset.pingsReceived",
    ] {
        assert!(html.contains(hook), "{hook}");
    }
    for wire in [
        "/demo.json",
        "/demo/orders",
        "/metrics",
        "/realtime/v1/websocket?apikey=",
        "vsn=2.0.0",
        "'phx_join'",
        "'access_token'",
        "'heartbeat'",
        "'presence_state'",
        "'presence_diff'",
        "'broadcast'",
    ] {
        assert!(html.contains(wire), "{wire}");
    }
}
