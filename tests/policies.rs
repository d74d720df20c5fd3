//! The policy compiler against a real catalog: the shapes of Supabase's
//! example apps and the mixed shapes of rls-policies.md, read from a
//! migrated database, become the plans docs/policies.md promises; the
//! replay tool's copy of sql/'s catalog compiles to the same plans as the
//! live one.

use walcast::hub::{Binding, Control, EventMatch, Outbox, OutboxLimits, Subscription, Vsn};
use walcast::policy::plan::load;
use walcast::policy::{Access, Filter, Viewer};

use crate::support::migrated_db;

const SHAPES: &str = "
create table public.todos (id bigint generated always as identity primary key, user_id uuid, task text,
                           is_complete boolean);
alter table public.todos enable row level security;
create policy own_todos on public.todos for select to authenticated using ((select auth.uid()) = user_id);
grant select on public.todos to authenticated;

create table public.channels (id bigint primary key, slug text, created_by uuid);
alter table public.channels enable row level security;
create policy read_channels on public.channels for select using (auth.role() = 'authenticated');
grant select on public.channels to anon, authenticated, service_role;

create table public.team_members (team_id uuid, user_id uuid, role text, accepted boolean,
                                  primary key (team_id, user_id));
grant select on public.team_members to authenticated;
create table public.projects (id uuid primary key, team_id uuid, status text, secret text);
alter table public.projects enable row level security;
create policy member_projects on public.projects for select to authenticated using (
    team_id in (select tm.team_id from public.team_members tm where tm.user_id = (select auth.uid()) and tm.accepted));
create policy admin_projects on public.projects for select to authenticated using (exists (
    select 1 from public.team_members tm where tm.team_id = projects.team_id and tm.user_id = auth.uid()
    and tm.role in ('owner', 'admin')));
create policy mfa on public.projects as restrictive for select to authenticated
    using (((select auth.jwt()) ->> 'aal') = 'aal2');
grant select (id, team_id, status) on public.projects to authenticated;

create table public.weird (id bigint primary key, created_at timestamptz);
alter table public.weird enable row level security;
create policy recent on public.weird for select to authenticated using (created_at > now() - interval '1 day');
grant select on public.weird to authenticated;

create table public.crew (crew_id uuid, user_id uuid, primary key (crew_id, user_id));
create table public.boats (id uuid primary key, crew_id uuid);
alter table public.boats enable row level security;
create policy crew_boats on public.boats for select to authenticated using (
    crew_id in (select c.crew_id from public.crew c where c.user_id = (select auth.uid())));
grant select on public.boats, public.crew to authenticated;

alter publication supabase_realtime add table public.todos, public.channels, public.team_members,
    public.projects, public.weird, public.boats;
";

#[tokio::test]
async fn real_catalogs_compile_to_the_documented_plans() {
    let (_db, mut client) = migrated_db().await;
    client.batch_execute(SHAPES).await.expect("shapes");
    let loaded = load(&mut client, &["supabase_realtime".to_owned()], None).await.expect("policies load");
    let plan = |table: &str, role: &str| {
        let t = loaded.policies.table_by_name("public", table).unwrap_or_else(|| panic!("{table} is published"));
        t.role(role).unwrap_or_else(|| panic!("role {role}")).describe(&t.columns, &loaded.caches)
    };
    let access = |table: &str, role: &str| {
        loaded.policies.table_by_name("public", table).and_then(|t| t.role(role)).map(|p| p.access.clone()).unwrap()
    };
    assert_eq!(plan("todos", "authenticated"), "in memory (auth.uid() = user_id)");
    assert!(matches!(access("todos", "anon"), Access::Nothing(_)));
    // auth.role() is the viewer's own role: folded per role.
    assert_eq!(plan("channels", "authenticated"), "every row");
    assert!(matches!(access("channels", "anon"), Access::Nothing(_)), "{}", plan("channels", "anon"));
    assert!(matches!(access("channels", "service_role"), Access::Everything));
    // Membership in both forms (two caches: their conditions differ), the
    // restrictive MFA gate, and the column grant.
    let projects = plan("projects", "authenticated");
    assert!(projects.starts_with("in memory ("), "{projects}");
    assert!(projects.contains("public.team_members(user_id → team_id) where accepted"), "{projects}");
    assert!(projects.contains("auth.jwt() ->> 'aal' = 'aal2'"), "{projects}");
    assert!(projects.ends_with("; columns id, team_id, status"), "{projects}");
    assert_eq!(loaded.caches.specs().len(), 3, "orders/dealer_memberships' cache and the two team_members caches");
    // now(): database-evaluated, with the reason.
    let weird = plan("weird", "authenticated");
    assert!(weird.starts_with("database-evaluated (policy recent:"), "{weird}");
    // A membership table outside the publication: its changes cannot be
    // followed, so PostgreSQL judges, and the plan names the fix.
    let boats = plan("boats", "authenticated");
    assert!(boats.starts_with("database-evaluated ("), "{boats}");
    assert!(boats.contains("ALTER PUBLICATION supabase_realtime ADD TABLE public.crew"), "{boats}");
    // sql/'s own tables: membership through the SECURITY DEFINER helper.
    assert_eq!(
        plan("orders", "authenticated"),
        "in memory (member public.dealer_memberships(user_id → dealership_id) (auth.uid() → dealership_id))"
    );
}

#[tokio::test]
async fn the_replay_tools_copy_of_sql_compiles_like_the_live_catalog() {
    let (_db, mut client) = migrated_db().await;
    let live = load(&mut client, &["supabase_realtime".to_owned()], None).await.expect("policies load");
    let orders = live.policies.table_by_name("public", "orders").expect("orders");
    let members = live.policies.table_by_name("public", "dealer_memberships").expect("memberships");
    let copy = walcast::load::schema::dealership_loaded(orders.oid, members.oid, &[]);
    for table in ["orders", "dealer_memberships"] {
        let a = live.policies.table_by_name("public", table).unwrap();
        let b = copy.policies.table_by_name("public", table).unwrap();
        assert_eq!(a.columns, b.columns, "{table}'s columns");
        for role in ["anon", "authenticated", "service_role"] {
            assert_eq!(
                a.role(role).unwrap().describe(&a.columns, &live.caches),
                b.role(role).unwrap().describe(&b.columns, &copy.caches),
                "{table} as {role}"
            );
        }
    }
}

const PLPGSQL: &str = "
create function public.may_see_note(owner uuid) returns boolean language plpgsql stable as $$
begin
    if owner is null then
        raise exception 'a note without an owner';
    end if;
    return owner = (select auth.uid());
end
$$;
create table public.notes (id uuid primary key, owner uuid, body text);
alter table public.notes replica identity full;
alter table public.notes enable row level security;
create policy own_notes on public.notes for select to authenticated using (public.may_see_note(owner));
grant select on public.notes to authenticated;
alter publication supabase_realtime add table public.notes;
";

fn notes_subscription(conn: u64, user: uuid::Uuid, outbox: &std::sync::Arc<Outbox>) -> Subscription {
    Subscription {
        conn,
        topic: "realtime:notes".into(),
        vsn: Vsn::V2,
        viewer: Viewer::user(user),
        bindings: vec![Binding {
            id: 1,
            schema: Some("public".into()),
            table: Some("notes".into()),
            event: EventMatch::All,
            filter: Filter::default(),
            select: None,
        }],
        outbox: std::sync::Arc::clone(outbox),
        on_live: None,
        on_withheld: None,
    }
}

/// `(event, id)` of the postgres_changes frames in `frames`.
fn events(frames: &[bytes::Bytes]) -> Vec<(String, String)> {
    frames
        .iter()
        .filter_map(|f| {
            let v: serde_json::Value = serde_json::from_slice(f).ok()?;
            let data = &v[4]["data"];
            let row = if data["type"] == "DELETE" { &data["old_record"] } else { &data["record"] };
            Some((data["type"].as_str()?.to_owned(), row["id"].as_str()?.to_owned()))
        })
        .collect()
}

#[tokio::test]
async fn policies_walcast_cannot_compile_are_evaluated_by_postgres_on_the_committed_row() {
    let (db, client) = migrated_db().await;
    client.batch_execute(PLPGSQL).await.expect("schema");
    let relay = crate::policy_differential::start_relay(db.url(), &format!("{}_s", db.name())).await;
    let plans = relay.hub.policies();
    let notes = plans.table_by_name("public", "notes").expect("notes published");
    assert!(matches!(notes.role("authenticated").unwrap().access, Access::Database(_)));
    let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let boxes: Vec<_> = [a, b].iter().map(|_| std::sync::Arc::new(Outbox::new(OutboxLimits::default()))).collect();
    for (i, (user, outbox)) in [a, b].iter().zip(&boxes).enumerate() {
        relay.hub.send(Control::Join(notes_subscription(i as u64, *user, outbox))).await.unwrap();
    }
    let (n1, n2) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    client.execute("insert into public.notes values ($1, $2, 'a''s')", &[&n1, &a]).await.unwrap();
    client.execute("insert into public.notes values ($1, $2, 'b''s')", &[&n2, &b]).await.unwrap();
    // Moved from a to b, then changed again in the same transaction: each
    // change is judged on its own committed image, not the live row.
    client
        .batch_execute(&format!(
            "begin; update public.notes set owner = '{b}' where id = '{n1}'; \
             update public.notes set body = 'moved' where id = '{n1}'; commit;"
        ))
        .await
        .unwrap();
    // An owner-less note makes the policy raise: denied, counted, and the
    // relay goes on.
    client.execute("insert into public.notes values ($1, null, 'orphan')", &[&uuid::Uuid::new_v4()]).await.unwrap();
    client.execute("delete from public.notes where id = $1", &[&n2]).await.unwrap();
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    crate::policy_differential::wait_for_frames(&boxes[1], 4, &mut got_b).await;
    crate::policy_differential::wait_for_frames(&boxes[0], 2, &mut got_a).await;
    let (s1, s2) = (n1.to_string(), n2.to_string());
    let ev = |e: &str, id: &String| (e.to_owned(), id.clone());
    assert_eq!(events(&got_a), vec![ev("INSERT", &s1), ev("DELETE", &s1)], "a: its note, then the move-out");
    assert_eq!(
        events(&got_b),
        vec![ev("INSERT", &s2), ev("INSERT", &s1), ev("UPDATE", &s1), ev("DELETE", &s2)],
        "b: its note, the move-in, the edit, the delete"
    );
    let stats = &relay.hub.stats.database;
    assert!(stats.evaluated.load(std::sync::atomic::Ordering::Relaxed) >= 6);
    assert!(stats.errors.load(std::sync::atomic::Ordering::Relaxed) >= 1, "the raising policy is counted");
    // Nothing more arrives (the orphan reached nobody).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    boxes[0].try_drain(&mut got_a);
    boxes[1].try_drain(&mut got_b);
    assert_eq!((events(&got_a).len(), events(&got_b).len()), (2, 4));
    relay.stop().await.unwrap();
}
