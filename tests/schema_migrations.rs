//! Migrations: applying to an empty database, applying twice, refusing a
//! changed or unknown file, leaving an existing auth schema alone.

use crate::support::{empty_db, migrated_db};
use walcast::schema::{migrate, Migrations, SchemaError};

/// Everything the migrations define, as text, independent of OIDs: compare two
/// snapshots to prove nothing changed.
pub(crate) const CATALOG_SNAPSHOT: &str = r#"
with ours as (
    select c.oid, c.relname, c.relkind
    from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where n.nspname in ('public', 'private', 'auth', 'walcast')
)
select string_agg(x, E'\n' order by x) from (
    select format('rel %s kind=%s identity=%s rls=%s acl=%s', c.oid::regclass, c.relkind, c.relreplident,
                  c.relrowsecurity, c.relacl)
    from pg_class c where c.oid in (select oid from ours)
    union all
    select format('col %s.%s %s notnull=%s default=%s acl=%s', a.attrelid::regclass, a.attname,
                  format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid), a.attacl)
    from pg_attribute a
    left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
    where a.attrelid in (select oid from ours where relkind in ('r', 'p')) and a.attnum > 0 and not a.attisdropped
    union all
    select format('con %s %s %s', conrelid::regclass, conname, pg_get_constraintdef(oid))
    from pg_constraint where conrelid in (select oid from ours)
    union all
    select format('idx %s', pg_get_indexdef(indexrelid)) from pg_index where indrelid in (select oid from ours)
    union all
    select format('pol %s %s %s %s using=%s check=%s', polrelid::regclass, polname, polcmd, polroles::regrole[],
                  pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid))
    from pg_policy where polrelid in (select oid from ours)
    union all
    select format('fn %s %s acl=%s', p.oid::regprocedure, md5(pg_get_functiondef(p.oid)), p.proacl)
    from pg_proc p join pg_namespace n on n.oid = p.pronamespace
    where n.nspname in ('public', 'private', 'auth')
    union all
    select format('trg %s', pg_get_triggerdef(oid)) from pg_trigger
    where not tgisinternal and tgrelid in (select oid from ours)
    union all
    select format('pub %s %s.%s', pubname, schemaname, tablename) from pg_publication_tables
    union all
    select format('ns %s acl=%s', nspname, nspacl) from pg_namespace where nspname in ('public', 'private', 'auth', 'walcast')
    union all
    select format('role %s bypassrls=%s login=%s inherit=%s', rolname, rolbypassrls, rolcanlogin, rolinherit)
    from pg_roles where rolname in ('anon', 'authenticated', 'service_role')
    union all
    select format('migration %s %s %s', name, checksum, applied_at) from walcast.schema_migrations
) s(x)
"#;

pub(crate) async fn snapshot(client: &tokio_postgres::Client) -> String {
    client.query_one(CATALOG_SNAPSHOT, &[]).await.expect("snapshot").get(0)
}

#[tokio::test]
async fn migrations_apply_to_an_empty_database() {
    let (_db, mut client) = empty_db().await;
    let report = migrate(&mut client, &Migrations::embedded()).await.expect("migrate");
    let names: Vec<String> = Migrations::embedded().iter().map(|m| m.name.clone()).collect();
    assert_eq!(report.applied, names);
    assert!(report.unchanged.is_empty());

    let recorded: Vec<(String, String)> = client
        .query("select name, checksum from walcast.schema_migrations order by name", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected: Vec<(String, String)> =
        Migrations::embedded().iter().map(|m| (m.name.clone(), m.checksum())).collect();
    assert_eq!(recorded, expected);

    for table in ["dealerships", "profiles", "dealer_memberships", "orders"] {
        let rls: bool = client
            .query_one(
                "select relrowsecurity from pg_class where oid = $1::text::regclass",
                &[&format!("public.{table}")],
            )
            .await
            .unwrap()
            .get(0);
        assert!(rls, "RLS must be enabled on {table}");
    }
}

#[tokio::test]
async fn applying_twice_changes_nothing() {
    let (_db, mut client) = empty_db().await;
    migrate(&mut client, &Migrations::embedded()).await.expect("first run");
    let before = snapshot(&client).await;
    assert!(before.contains("pol orders orders_select_member"), "snapshot sees policies");

    let report = migrate(&mut client, &Migrations::embedded()).await.expect("second run");
    assert!(report.applied.is_empty(), "nothing to apply the second time: {report:?}");
    assert_eq!(report.unchanged.len(), Migrations::embedded().iter().count());
    assert_eq!(snapshot(&client).await, before, "a second run changed the catalog");

    // Each file is idempotent on its own too, not only through the bookkeeping.
    for m in Migrations::embedded().iter() {
        client.batch_execute(&m.sql).await.unwrap_or_else(|e| panic!("re-running {}: {e}", m.name));
    }
    assert_eq!(snapshot(&client).await, before, "re-running the files changed the catalog");
}

#[tokio::test]
async fn a_changed_file_is_refused_with_its_name() {
    let (_db, mut client) = empty_db().await;
    let dir = tempfile::tempdir().unwrap();
    for m in Migrations::embedded().iter() {
        std::fs::write(dir.path().join(&m.name), &m.sql).unwrap();
    }
    let report = migrate(&mut client, &Migrations::from_dir(dir.path()).unwrap()).await.unwrap();
    assert_eq!(report.applied.len(), Migrations::embedded().iter().count());

    // Edit an applied file and add a new one: nothing may be applied.
    let edited = dir.path().join("0004_row_level_security.sql");
    let mut sql = std::fs::read_to_string(&edited).unwrap();
    sql.push_str("\n-- an innocent-looking edit\n");
    std::fs::write(&edited, sql).unwrap();
    std::fs::write(dir.path().join("0099_new.sql"), "create table public.should_not_exist (id int);").unwrap();

    let err = migrate(&mut client, &Migrations::from_dir(dir.path()).unwrap()).await.unwrap_err();
    assert!(
        matches!(&err, SchemaError::ChecksumMismatch { name, .. } if name == "0004_row_level_security.sql"),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("0004_row_level_security.sql"), "{message}");
    assert!(message.contains("new migration"), "the error tells the fix: {message}");
    assert!(!err.is_transient());
    let created: Option<String> =
        client.query_one("select to_regclass('public.should_not_exist')::text", &[]).await.unwrap().get(0);
    assert_eq!(created, None, "nothing is applied after a checksum mismatch");
}

#[tokio::test]
async fn an_unknown_applied_migration_is_refused() {
    let (_db, mut client) = migrated_db().await;
    client
        .execute("insert into walcast.schema_migrations (name, checksum) values ('0099_from_the_future.sql', 'x')", &[])
        .await
        .unwrap();
    let err = migrate(&mut client, &Migrations::embedded()).await.unwrap_err();
    assert!(matches!(&err, SchemaError::UnknownApplied { name } if name == "0099_from_the_future.sql"), "{err:?}");
}

#[tokio::test]
async fn a_failing_migration_rolls_back_and_names_the_file() {
    let (_db, mut client) = empty_db().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("0001_ok.sql"), "create table public.t1 (id int);").unwrap();
    std::fs::write(dir.path().join("0002_bad.sql"), "create table public.t2 (id int); select 1/0;").unwrap();
    let err = migrate(&mut client, &Migrations::from_dir(dir.path()).unwrap()).await.unwrap_err();
    assert!(matches!(&err, SchemaError::Apply { name, .. } if name == "0002_bad.sql"), "{err:?}");
    let row =
        client.query_one("select to_regclass('public.t1')::text, to_regclass('public.t2')::text", &[]).await.unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("t1"), "the good file stays applied");
    assert_eq!(row.get::<_, Option<String>>(1), None, "the failing file is rolled back whole");
    let recorded: i64 = client.query_one("select count(*) from walcast.schema_migrations", &[]).await.unwrap().get(0);
    assert_eq!(recorded, 1);
}

#[tokio::test]
async fn an_existing_auth_schema_is_left_alone() {
    // A Supabase database already has auth.uid() & co.; ours must not replace them.
    let (_db, mut client) = empty_db().await;
    client
        .batch_execute(
            "create schema auth;
             create table auth.users (id uuid primary key, email text, instance_id uuid);
             create function auth.uid() returns uuid language sql stable
                 as $$ select '00000000-0000-0000-0000-0000000000aa'::uuid $$;",
        )
        .await
        .unwrap();
    migrate(&mut client, &Migrations::embedded()).await.expect("migrate");
    let uid: uuid::Uuid = client.query_one("select auth.uid()", &[]).await.unwrap().get(0);
    assert_eq!(uid.to_string(), "00000000-0000-0000-0000-0000000000aa");
    let has_instance_id: bool = client
        .query_one(
            "select exists (select from information_schema.columns \
             where table_schema = 'auth' and table_name = 'users' and column_name = 'instance_id')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(has_instance_id, "the existing auth.users is kept");
    // The functions that were absent were created.
    let role: Option<String> = client.query_one("select auth.role()", &[]).await.unwrap().get(0);
    assert_eq!(role, None);
}

#[tokio::test]
async fn auth_functions_read_the_request_claims() {
    let (_db, client) = migrated_db().await;
    let row = client
        .query_one(
            "select set_config('request.jwt.claims', '{\"sub\":\"6f1c8a4e-0000-4000-8000-000000000001\",\"role\":\"authenticated\",\"email\":\"a@b.c\"}', false),
                    auth.uid()::text, auth.role(), auth.jwt() ->> 'email'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(1), "6f1c8a4e-0000-4000-8000-000000000001");
    assert_eq!(row.get::<_, String>(2), "authenticated");
    assert_eq!(row.get::<_, String>(3), "a@b.c");
    let roles: Vec<(String, bool)> = client
        .query(
            "select rolname::text, rolbypassrls from pg_roles where rolname in ('anon', 'authenticated', 'service_role') order by 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(roles, vec![("anon".into(), false), ("authenticated".into(), false), ("service_role".into(), true)]);
}
