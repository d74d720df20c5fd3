//! The policy compiler against a real catalog: the shapes of Supabase's
//! example apps and the mixed shapes of rls-policies.md, read from a
//! migrated database, become the plans docs/policies.md promises; the
//! replay tool's copy of sql/'s catalog compiles to the same plans as the
//! live one.

use walcast::policy::plan::load;
use walcast::policy::Access;

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

alter publication supabase_realtime add table public.todos, public.channels, public.team_members,
    public.projects, public.weird;
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
