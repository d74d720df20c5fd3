//! The differential test, generalized: random schemas, policies and
//! workloads, with PostgreSQL's own row level security as the oracle.
//!
//! Per seed (a deterministic xorshift PRNG, so a failure replays):
//!
//! - **Schema**: 1–3 protected tables `p0..` (`id uuid` primary key, `owner`,
//!   `grp`, `status`, `flag`, `due`; REPLICA IDENTITY FULL, published) and
//!   1–2 membership tables `m0..` (`id, user_id, group_id, role, accepted`;
//!   REPLICA IDENTITY FULL, published; some under their own RLS, so a
//!   policy's subquery on them can hide rows from the viewer). Per membership
//!   table, SECURITY DEFINER helpers in `private` (SQL returning `setof uuid`
//!   or boolean, one with a defaulted argument, and one PL/pgSQL).
//!   Per protected table 1–4 policies drawn from the shapes of
//!   rls-policies.md §1 — owner (wrapped or bare `auth.uid()`), `true`,
//!   `auth.role()`, an `app_metadata` claim, membership through `IN` and
//!   `EXISTS` (with `accepted` / role conditions) and through the helpers,
//!   column constants, AND/OR/NOT — permissive or restrictive (the `aal2`
//!   gate), `FOR SELECT` or `FOR ALL`, `TO` anon / authenticated / PUBLIC,
//!   plus shapes PostgreSQL must evaluate (the PL/pgSQL helper, `now()`, a
//!   subquery on an RLS-protected membership table). `due` is always far in
//!   the past or the future, so `now()` policies do not change with time.
//!   SELECT grants to `anon` and `authenticated`: none, the table, or some
//!   columns (always `id`).
//! - **Viewers**: 10–30 users (claims `sub`, `role`, `app_metadata.org`,
//!   `aal`), `anon` and `service_role`; one subscription each, bound to every
//!   generated table. Policies and data exist before the relay starts (it
//!   reads policies at start).
//! - **Churn**: a serial driver commits random transactions of 1–5
//!   statements mixing row inserts, updates (moving rows between owners,
//!   groups, statuses) and deletes with membership inserts, deletes and
//!   role / `accepted` / group changes; a row is touched at most once per
//!   transaction.
//! - **Oracle**: after each commit, per viewer, in one rolled-back
//!   transaction: `SET LOCAL ROLE` + `request.jwt.claims` + SELECT of the
//!   touched ids (the new images); then, as superuser, the old images of the
//!   touched protected rows are written back and the same SELECT gives the
//!   old images' visibility; then likewise for the membership tables. So the
//!   old image is judged against the memberships *as of the commit* — what
//!   walcast promises ("membership changes in a transaction apply before its
//!   rows are judged", docs/policies.md). Visibility transitions give the
//!   expected INSERT / UPDATE / DELETE.
//! - **Compare**: each viewer must receive exactly the expected events of
//!   each transaction (as a multiset: database-evaluated tables may arrive
//!   after in-memory ones); the driver waits for service_role to see the
//!   whole transaction and for the database evaluation queue to drain before
//!   the next commit, so "now" for database-evaluated policies is the
//!   commit. Leaks (delivered, not expected) and misses are counted over
//!   every (change, viewer) pair; a failure prints the seed, the schema, the
//!   relay's plans and the first mismatches with their transactions.
//!
//! The driver commits synchronously, so the relay may receive a commit
//! before other sessions see it (database evaluation waits for visibility,
//! docs/policies.md); `WALCAST_RANDOM_SYNC_COMMIT=0` makes every commit
//! visible before the relay receives it.
//!
//! `WALCAST_RANDOM_SEEDS` (default 10), `WALCAST_RANDOM_SEED` (first seed),
//! `WALCAST_RANDOM_TXS` (transactions per seed, default 150) and
//! `WALCAST_RANDOM_PARALLEL` (seeds at a time, default 2) make longer runs
//! (docs/policies.md).
//!
//! # Concurrent writers, and a policy created while they run
//!
//! The second test (`WALCAST_CONCURRENT_SEEDS`, default 6, from
//! `WALCAST_CONCURRENT_SEED`, default 1001; `WALCAST_CONCURRENT_ROUNDS`
//! rounds per seed, default 60) generates the same worlds and drives them in
//! **rounds**: 2–3 random transactions per round, each on its own connection
//! (synchronous commit), run at once with short pauses between statements so
//! that they interleave in the WAL and commit in an order nobody chose. The
//! transactions of a round touch disjoint rows (so none waits for another's
//! row locks and the model knows every image); each records
//! `txid_current()` just before its COMMIT.
//!
//! - **Commit order** is read back from the WAL: a second logical slot
//!   (pgoutput over the SQL interface, `pg_logical_slot_get_binary_changes`)
//!   lists the round's COMMIT messages in commit order, each with its xid.
//! - **Oracle**: once the round is in (service_role has every change and the
//!   database evaluation queue is empty), per viewer, one rolled-back
//!   transaction walks back from the state after the last commit: per
//!   transaction, newest first, the SELECT of its new images (the state as of
//!   its commit), its protected rows written back (its inserted rows deleted)
//!   and the SELECT of their old images (memberships still as of its commit),
//!   its membership rows written back and their SELECT, then its DDL undone:
//!   the state as of the previous commit. So every transaction is judged by
//!   the rows, memberships and policies as of its own commit, whatever the
//!   interleaving — exactly the serial oracle, per commit.
//! - **What walcast cannot promise under concurrency**: a table PostgreSQL
//!   evaluates reads the membership tables *as of the evaluation*, not the
//!   commit (docs/policies.md), and with concurrent writers the evaluation of
//!   one transaction may run after a later one committed. The generator
//!   therefore forms a group of each database-evaluated table and the
//!   membership tables its policies read, and lets at most one transaction of
//!   a round touch a group; other tables (in-memory plans, memberships they
//!   read) are shared freely. Rounds are drained before the next, so an
//!   evaluation never sees a later round.
//! - **The late membership table**: at round `rounds/4` a transaction creates
//!   `public.mn` (REPLICA IDENTITY FULL, published, granted) while the
//!   writers run; at the next round one fills it; from then on the writers
//!   churn it. At round `rounds/2` a transaction creates a permissive policy
//!   on a random protected table reading `mn` (`EXISTS` or `IN`, with a
//!   random `accepted` / role condition). walcast's promise (with the event
//!   trigger of `walcast setup`, installed here): transactions committed
//!   after the policy's commit are judged by it, none before; its new
//!   membership cache is read at the reload, and until the stream passes the
//!   WAL position read after that load the policy's table is evaluated by
//!   PostgreSQL (as of now). The oracle follows the commit order (the
//!   policy's transaction undoes itself, `DROP POLICY`, in the walk back);
//!   in the policy's round the policy's table, its membership tables and
//!   `mn` are one group, given to a transaction that sleeps first, so its
//!   writes to the table wait for the policy's lock and commit just after
//!   it, inside the window (the report counts the database evaluations of
//!   that round). The driver then waits for the reload before the next round,
//!   whose transactions thus commit after the load position: the table is
//!   judged in memory again (as planned), and the group rule holds it only
//!   if it is database-evaluated anyway (then reading `mn` too).
//!
//! Pass criterion as above: 0 leaks and 0 misses over every (change, viewer)
//! pair. A seed replays the same transactions per round; their interleaving
//! and commit order are up to the scheduler (the failure report prints each
//! failing round in commit order).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::json;
use tokio_postgres::{Client, SimpleQueryMessage};
use uuid::Uuid;
use walcast::hub::{Binding, Control, EventMatch, Outbox, OutboxLimits, Subscription, Vsn};
use walcast::policy::{Access, Filter, Viewer};
use walcast::relay::Relay;
use walcast::schema::{self, Migrations};

use crate::policy_differential::{parse_frames, start_relay};
use crate::support::migrated_db;

/// Deterministic PRNG (xorshift64*), seeded through splitmix64 so that
/// neighbouring seeds diverge at once.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    /// True with probability `percent`/100.
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
    fn uuid(&mut self) -> Uuid {
        Uuid::from_u64_pair(self.next(), self.next())
    }
}

/// What a role may SELECT of a generated table.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Grant {
    None,
    Table,
    /// Some columns, `id` among them.
    Columns,
}

/// A generated table.
#[derive(Debug, Clone)]
struct TableSpec {
    name: String,
    membership: bool,
    anon: Grant,
    authenticated: Grant,
}

impl TableSpec {
    fn grant(&self, role: &str) -> Grant {
        match role {
            "anon" => self.anon,
            "authenticated" => self.authenticated,
            _ => Grant::Table,
        }
    }
}

/// A protected row.
#[derive(Debug, Clone, PartialEq)]
struct ProtRow {
    owner: Option<Uuid>,
    grp: Option<Uuid>,
    status: &'static str,
    flag: bool,
    /// `due` far in the past (else far in the future).
    past: bool,
}

/// A membership row.
#[derive(Debug, Clone, PartialEq)]
struct MemRow {
    user: Uuid,
    group: Uuid,
    role: &'static str,
    accepted: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Values {
    P(ProtRow),
    M(MemRow),
}

const STATUSES: [&str; 3] = ["draft", "published", "archived"];
const MEMBER_ROLES: [&str; 3] = ["member", "admin", "owner"];

fn lit(u: Option<Uuid>) -> String {
    u.map_or_else(|| "null".to_owned(), |u| format!("'{u}'"))
}

impl Values {
    fn columns(&self) -> &'static str {
        match self {
            Values::P(_) => "id, owner, grp, status, flag, due",
            Values::M(_) => "id, user_id, group_id, role, accepted",
        }
    }

    fn tuple(&self, id: Uuid) -> String {
        match self {
            Values::P(p) => format!(
                "('{id}', {}, {}, '{}', {}, '{}')",
                lit(p.owner),
                lit(p.grp),
                p.status,
                p.flag,
                if p.past { "2000-01-01 00:00:00+00" } else { "2100-01-01 00:00:00+00" }
            ),
            Values::M(m) => format!("('{id}', '{}', '{}', '{}', {})", m.user, m.group, m.role, m.accepted),
        }
    }

    fn assignments(&self) -> String {
        match self {
            Values::P(p) => format!(
                "owner = {}, grp = {}, status = '{}', flag = {}, due = '{}'",
                lit(p.owner),
                lit(p.grp),
                p.status,
                p.flag,
                if p.past { "2000-01-01 00:00:00+00" } else { "2100-01-01 00:00:00+00" }
            ),
            Values::M(m) => format!(
                "user_id = '{}', group_id = '{}', role = '{}', accepted = {}",
                m.user, m.group, m.role, m.accepted
            ),
        }
    }
}

/// A viewer: the relay's [`Viewer`] and how PostgreSQL runs its queries.
struct ViewerSpec {
    label: String,
    role: &'static str,
    claims: String,
    viewer: Viewer,
}

/// A generated world: schema, viewers, rows.
struct World {
    sql: String,
    tables: Vec<TableSpec>,
    /// Per table: id → values.
    rows: Vec<BTreeMap<Uuid, Values>>,
    users: Vec<Uuid>,
    groups: Vec<Uuid>,
    viewers: Vec<ViewerSpec>,
    /// Policy atoms that must go to the database.
    database_atoms: usize,
    atoms: usize,
    /// Per table: the membership tables its policies read (subqueries and
    /// helpers).
    reads: Vec<BTreeSet<usize>>,
}

/// Policy expression generator.
struct PolicyGen<'a> {
    rng: &'a mut Rng,
    members: usize,
    database_atoms: usize,
    atoms: usize,
    /// Per protected table `p{i}`: the membership tables `m{j}` read.
    reads: BTreeMap<usize, BTreeSet<usize>>,
}

impl PolicyGen<'_> {
    fn member_condition(&mut self) -> &'static str {
        self.rng.pick(&[
            "",
            " and m.accepted",
            " and m.role in ('admin', 'owner')",
            " and m.accepted and m.role = 'admin'",
        ])
    }

    fn uid(&mut self) -> &'static str {
        if self.rng.chance(50) {
            "(select auth.uid())"
        } else {
            "auth.uid()"
        }
    }

    /// One boolean expression over `p{table}`.
    fn expr(&mut self, table: usize, depth: usize) -> String {
        let roll = if depth >= 2 { self.rng.below(80) } else { self.rng.below(100) };
        let j = self.rng.below(self.members);
        if roll < 80 {
            self.atoms += 1;
        }
        if (33..=69).contains(&roll) || (90..=94).contains(&roll) {
            self.reads.entry(table).or_default().insert(j);
        }
        match roll {
            0..=13 => format!("{} = owner", self.uid()),
            14..=18 => "true".to_owned(),
            19..=24 => "auth.role() = 'authenticated'".to_owned(),
            25..=32 => "grp = ((select auth.jwt()) -> 'app_metadata' ->> 'org')::uuid".to_owned(),
            33..=44 => {
                let uid = self.uid();
                let cond = self.member_condition();
                format!("grp in (select m.group_id from public.m{j} m where m.user_id = {uid}{cond})")
            }
            45..=56 => {
                let uid = self.uid();
                let cond = self.member_condition();
                format!(
                    "exists (select 1 from public.m{j} m where m.group_id = p{table}.grp and m.user_id = {uid}{cond})"
                )
            }
            57..=62 => format!("grp in (select private.m{j}_groups())"),
            63..=69 => match self.rng.below(4) {
                0 => format!("(select private.m{j}_member(grp))"),
                1 => format!("private.m{j}_member(grp)"),
                2 => format!("private.m{j}_has_role(grp)"),
                _ => format!("private.m{j}_has_role(grp, 'admin')"),
            },
            70..=79 => self
                .rng
                .pick(&[
                    "status = 'published'",
                    "flag",
                    "status in ('published', 'archived')",
                    "status <> 'draft'",
                    "owner is null",
                ])
                .to_owned(),
            80..=89 => {
                let a = self.expr(table, depth + 1);
                match self.rng.below(3) {
                    0 => format!("({a}) and ({})", self.expr(table, depth + 1)),
                    1 => format!("({a}) or ({})", self.expr(table, depth + 1)),
                    _ => format!("not ({a})"),
                }
            }
            90..=94 => {
                self.atoms += 1;
                self.database_atoms += 1;
                format!("private.m{j}_plpg(grp)")
            }
            _ => {
                self.atoms += 1;
                self.database_atoms += 1;
                "due < now()".to_owned()
            }
        }
    }
}

fn generate(seed: u64) -> World {
    let mut rng = Rng::new(seed);
    let protected = rng.range(1, 3);
    let members = rng.range(1, 2);
    let groups: Vec<Uuid> = (0..rng.range(3, 5)).map(|_| rng.uuid()).collect();
    let users: Vec<Uuid> = (0..rng.range(10, 30)).map(|_| rng.uuid()).collect();
    let mut sql =
        String::from("create schema if not exists private;\ngrant usage on schema private to anon, authenticated;\n");
    let mut tables = Vec::new();
    let mut rows = Vec::new();

    for j in 0..members {
        let rls = rng.chance(40);
        let _ = writeln!(
            sql,
            "create table public.m{j} (id uuid primary key, user_id uuid not null, group_id uuid not null, role text not null, accepted boolean not null);
alter table public.m{j} replica identity full;
grant select on public.m{j} to anon, authenticated, service_role;
alter publication supabase_realtime add table public.m{j};"
        );
        if rls {
            let _ = writeln!(
                sql,
                "alter table public.m{j} enable row level security;
create policy m{j}_own on public.m{j} for select to authenticated using (user_id = (select auth.uid()));"
            );
        }
        let _ = writeln!(
            sql,
            "create function private.m{j}_groups() returns setof uuid language sql stable security definer set search_path = '' as $$
    select m.group_id from public.m{j} m where m.user_id = (select auth.uid()) and m.accepted $$;
create function private.m{j}_member(g uuid) returns boolean language sql stable security definer set search_path = '' as $$
    select exists (select 1 from public.m{j} m where m.group_id = g and m.user_id = (select auth.uid())) $$;
create function private.m{j}_has_role(g uuid, r text default null) returns boolean language sql stable security definer set search_path = '' as $$
    select exists (select 1 from public.m{j} m where m.group_id = g and m.user_id = (select auth.uid()) and (m.role = r or r is null)) $$;
create function private.m{j}_plpg(g uuid) returns boolean language plpgsql stable security definer set search_path = '' as $$
begin
    return exists (select 1 from public.m{j} m where m.group_id = g and m.user_id = (select auth.uid()) and m.accepted);
end $$;"
        );
        tables.push(TableSpec {
            name: format!("m{j}"),
            membership: true,
            anon: Grant::Table,
            authenticated: Grant::Table,
        });
        let mut table_rows = BTreeMap::new();
        for &u in &users {
            for &g in &groups {
                if rng.chance(30) {
                    let row = MemRow { user: u, group: g, role: rng.pick(&MEMBER_ROLES), accepted: rng.chance(70) };
                    table_rows.insert(rng.uuid(), Values::M(row));
                }
            }
        }
        rows.push(table_rows);
    }

    let mut gen = PolicyGen { rng: &mut rng, members, database_atoms: 0, atoms: 0, reads: BTreeMap::new() };
    for i in 0..protected {
        let _ = writeln!(
            sql,
            "create table public.p{i} (id uuid primary key, owner uuid, grp uuid, status text not null, flag boolean not null, due timestamptz not null);
alter table public.p{i} replica identity full;
alter table public.p{i} enable row level security;
grant select on public.p{i} to service_role;
alter publication supabase_realtime add table public.p{i};"
        );
        let authenticated = if gen.rng.chance(75) { Grant::Table } else { Grant::Columns };
        let anon = match gen.rng.below(10) {
            0..=3 => Grant::None,
            4..=7 => Grant::Table,
            _ => Grant::Columns,
        };
        for (role, grant) in [("authenticated", authenticated), ("anon", anon)] {
            match grant {
                Grant::None => {}
                Grant::Table => {
                    let _ = writeln!(sql, "grant select on public.p{i} to {role};");
                }
                Grant::Columns => {
                    let _ = writeln!(sql, "grant select (id, owner, status) on public.p{i} to {role};");
                }
            }
        }
        for k in 0..gen.rng.range(1, 4) {
            let restrictive = k > 0 && gen.rng.chance(20);
            let using = if restrictive && gen.rng.chance(50) {
                "((select auth.jwt()) ->> 'aal') = 'aal2'".to_owned()
            } else {
                gen.expr(i, 0)
            };
            let to = gen.rng.pick(&["authenticated", "authenticated", "public", "anon", "anon, authenticated"]);
            let command = if gen.rng.chance(70) { "select" } else { "all" };
            let kind = if restrictive { "restrictive" } else { "permissive" };
            let _ =
                writeln!(sql, "create policy pol{k} on public.p{i} as {kind} for {command} to {to} using ({using});");
        }
        tables.push(TableSpec { name: format!("p{i}"), membership: false, anon, authenticated });
        let mut table_rows = BTreeMap::new();
        for _ in 0..gen.rng.range(6, 10) {
            let row = random_row(gen.rng, &users, &groups);
            table_rows.insert(gen.rng.uuid(), Values::P(row));
        }
        rows.push(table_rows);
    }
    let (database_atoms, atoms) = (gen.database_atoms, gen.atoms);
    let reads = (0..members)
        .map(|_| BTreeSet::new())
        .chain((0..protected).map(|i| gen.reads.get(&i).cloned().unwrap_or_default()))
        .collect();

    let mut viewers = Vec::new();
    for (n, &u) in users.iter().enumerate() {
        let mut claims = json!({"sub": u.to_string(), "role": "authenticated", "aal": rng.pick(&["aal1", "aal2"])});
        claims["app_metadata"] =
            if rng.chance(80) { json!({"org": rng.pick(&groups).to_string()}) } else { json!({"provider": "email"}) };
        viewers.push(ViewerSpec {
            label: format!("user{n}"),
            role: "authenticated",
            claims: claims.to_string(),
            viewer: Viewer::new("authenticated", claims),
        });
    }
    viewers.push(ViewerSpec {
        label: "anon".into(),
        role: "anon",
        claims: json!({"role": "anon"}).to_string(),
        viewer: Viewer::anon(),
    });
    viewers.push(ViewerSpec {
        label: "service_role".into(),
        role: "service_role",
        claims: json!({"role": "service_role"}).to_string(),
        viewer: Viewer::service(),
    });
    World { sql, tables, rows, users, groups, viewers, database_atoms, atoms, reads }
}

fn random_row(rng: &mut Rng, users: &[Uuid], groups: &[Uuid]) -> ProtRow {
    ProtRow {
        owner: if rng.chance(85) { Some(rng.pick(users)) } else { None },
        grp: if rng.chance(85) { Some(rng.pick(groups)) } else { None },
        status: rng.pick(&STATUSES),
        flag: rng.chance(50),
        past: rng.chance(50),
    }
}

/// One change the driver made.
#[derive(Debug, Clone)]
struct Made {
    table: usize,
    op: &'static str,
    id: Uuid,
    /// The row before (UPDATE, DELETE).
    old: Option<Values>,
}

fn transition(op: &str, old: bool, new: bool) -> Option<&'static str> {
    match (op, old, new) {
        ("INSERT", _, true) => Some("INSERT"),
        ("DELETE", true, _) => Some("DELETE"),
        ("UPDATE", true, true) => Some("UPDATE"),
        ("UPDATE", false, true) => Some("INSERT"),
        ("UPDATE", true, false) => Some("DELETE"),
        _ => None,
    }
}

/// One random transaction: its SQL and its changes (applied to `world.rows`).
fn random_transaction(rng: &mut Rng, world: &mut World) -> (String, Vec<Made>) {
    let (statements, made) = random_statements(rng, world, &|_| true, &BTreeSet::new());
    (format!("begin;\n{}commit;", statements.concat()), made)
}

/// The statements of one random transaction over the tables `allowed`
/// admits, leaving the rows in `taken` alone (rows of the round's other
/// transactions); its changes are applied to `world.rows`. May be empty when
/// no table is allowed.
fn random_statements(
    rng: &mut Rng,
    world: &mut World,
    allowed: &dyn Fn(usize) -> bool,
    taken: &BTreeSet<Uuid>,
) -> (Vec<String>, Vec<Made>) {
    let mut statements = Vec::new();
    let mut made: Vec<Made> = Vec::new();
    let protected: Vec<usize> =
        (0..world.tables.len()).filter(|&t| !world.tables[t].membership && allowed(t)).collect();
    let memberships: Vec<usize> =
        (0..world.tables.len()).filter(|&t| world.tables[t].membership && allowed(t)).collect();
    for _ in 0..rng.range(1, 5) {
        let membership = rng.chance(40);
        let t = match (membership, protected.is_empty(), memberships.is_empty()) {
            (_, true, true) => break,
            (true, _, false) | (false, true, _) => rng.pick(&memberships),
            _ => rng.pick(&protected),
        };
        let membership = world.tables[t].membership;
        let name = world.tables[t].name.clone();
        let untouched: Vec<Uuid> = world.rows[t]
            .keys()
            .copied()
            .filter(|id| !made.iter().any(|m| m.id == *id) && !taken.contains(id))
            .collect();
        let op = match rng.below(10) {
            _ if untouched.is_empty() => 0,
            0..=2 => 0,
            3..=7 => 1,
            _ if world.rows[t].len() <= 3 => 1,
            _ => 2,
        };
        match op {
            0 => {
                let id = rng.uuid();
                let values = if membership {
                    Values::M(MemRow {
                        user: rng.pick(&world.users),
                        group: rng.pick(&world.groups),
                        role: rng.pick(&MEMBER_ROLES),
                        accepted: rng.chance(70),
                    })
                } else {
                    Values::P(random_row(rng, &world.users, &world.groups))
                };
                statements.push(format!(
                    "insert into public.{name} ({}) values {};\n",
                    values.columns(),
                    values.tuple(id)
                ));
                world.rows[t].insert(id, values);
                made.push(Made { table: t, op: "INSERT", id, old: None });
            }
            1 => {
                let id = rng.pick(&untouched);
                let old = world.rows[t][&id].clone();
                let mut new = old.clone();
                while new == old {
                    match &mut new {
                        Values::P(p) => match rng.below(6) {
                            0 | 1 => p.owner = if rng.chance(85) { Some(rng.pick(&world.users)) } else { None },
                            2 | 3 => p.grp = if rng.chance(85) { Some(rng.pick(&world.groups)) } else { None },
                            4 => p.status = rng.pick(&STATUSES),
                            _ => {
                                if rng.chance(70) {
                                    p.flag = !p.flag
                                } else {
                                    p.past = !p.past
                                }
                            }
                        },
                        Values::M(m) => match rng.below(4) {
                            0 => m.role = rng.pick(&MEMBER_ROLES),
                            1 => m.accepted = !m.accepted,
                            2 => m.group = rng.pick(&world.groups),
                            _ => m.user = rng.pick(&world.users),
                        },
                    }
                }
                statements.push(format!("update public.{name} set {} where id = '{id}';\n", new.assignments()));
                world.rows[t].insert(id, new);
                made.push(Made { table: t, op: "UPDATE", id, old: Some(old) });
            }
            _ => {
                let id = rng.pick(&untouched);
                let old = world.rows[t].remove(&id);
                statements.push(format!("delete from public.{name} where id = '{id}';\n"));
                made.push(Made { table: t, op: "DELETE", id, old });
            }
        }
    }
    (statements, made)
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn id_array(ids: &[Uuid]) -> String {
    let items: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    format!("'{{{}}}'::uuid[]", items.join(","))
}

/// Per viewer: the oracle's SQL for one transaction (one round trip).
fn oracle_sql(world: &World, viewer: &ViewerSpec, made: &[Made]) -> String {
    let as_viewer = format!(
        "set local role {}; select set_config('request.jwt.claims', {}, true);\n",
        viewer.role,
        quote(&viewer.claims)
    );
    let select = |sql: &mut String, side: &str, t: usize, ids: &[Uuid]| {
        let table = &world.tables[t];
        if ids.is_empty() || table.grant(viewer.role) == Grant::None {
            return;
        }
        let _ = writeln!(
            sql,
            "select '{side}', {t}, id::text from public.{} where id = any({});",
            table.name,
            id_array(ids)
        );
    };
    let mut sql = String::from("begin;\n");
    sql.push_str(&as_viewer);
    for t in 0..world.tables.len() {
        let ids: Vec<Uuid> = made.iter().filter(|m| m.table == t && m.op != "DELETE").map(|m| m.id).collect();
        select(&mut sql, "new", t, &ids);
    }
    // Old images: protected tables first (judged against the memberships as
    // of the commit), then the membership tables.
    for membership in [false, true] {
        let tables: Vec<usize> =
            (0..world.tables.len()).filter(|&t| world.tables[t].membership == membership).collect();
        let mut restore = String::new();
        let mut selects = String::new();
        for &t in &tables {
            let olds: Vec<(Uuid, &Values)> =
                made.iter().filter(|m| m.table == t).filter_map(|m| m.old.as_ref().map(|o| (m.id, o))).collect();
            if olds.is_empty() {
                continue;
            }
            let ids: Vec<Uuid> = olds.iter().map(|(id, _)| *id).collect();
            let name = &world.tables[t].name;
            let tuples: Vec<String> = olds.iter().map(|(id, v)| v.tuple(*id)).collect();
            let _ = writeln!(
                restore,
                "delete from public.{name} where id = any({});\ninsert into public.{name} ({}) values {};",
                id_array(&ids),
                olds[0].1.columns(),
                tuples.join(", ")
            );
            select(&mut selects, "old", t, &ids);
        }
        if !restore.is_empty() {
            sql.push_str("reset role;\n");
            sql.push_str(&restore);
            sql.push_str(&as_viewer);
            sql.push_str(&selects);
        }
    }
    sql.push_str("rollback;");
    sql
}

/// Per viewer: the expected `(table, id, event)`s of a transaction.
async fn oracle(client: &Client, world: &World, viewer: &ViewerSpec, made: &[Made]) -> Vec<(String, Uuid, String)> {
    let sql = oracle_sql(world, viewer, made);
    let messages = client.simple_query(&sql).await.unwrap_or_else(|e| panic!("oracle query failed: {e:?}\n{sql}"));
    let mut new = BTreeSet::new();
    let mut old = BTreeSet::new();
    for m in messages {
        if let SimpleQueryMessage::Row(row) = m {
            if row.len() != 3 {
                continue;
            }
            let t: usize = row.get(1).unwrap().parse().unwrap();
            let id = Uuid::parse_str(row.get(2).unwrap()).unwrap();
            match row.get(0) {
                Some("new") => new.insert((t, id)),
                _ => old.insert((t, id)),
            };
        }
    }
    made.iter()
        .filter_map(|m| {
            let event = transition(m.op, old.contains(&(m.table, m.id)), new.contains(&(m.table, m.id)))?;
            Some((world.tables[m.table].name.clone(), m.id, event.to_owned()))
        })
        .collect()
}

fn subscription(conn: u64, world: &World, viewer: Viewer, outbox: &Arc<Outbox>) -> Subscription {
    let bindings = world
        .tables
        .iter()
        .enumerate()
        .map(|(i, t)| Binding {
            id: i as u32 + 1,
            schema: Some("public".into()),
            table: Some(t.name.clone()),
            event: EventMatch::All,
            filter: Filter::default(),
            select: None,
        })
        .collect();
    Subscription {
        conn,
        topic: "realtime:random".into(),
        vsn: Vsn::V2,
        viewer,
        bindings,
        outbox: Arc::clone(outbox),
        on_live: Some(Bytes::from_static(br#"["1",null,"realtime:random","system",{"message":"live"}]"#)),
        on_withheld: None,
    }
}

/// What one seed's run found.
#[derive(Debug, Default)]
pub(crate) struct SeedReport {
    pub(crate) seed: u64,
    /// The concurrent driver's run.
    concurrent: bool,
    /// Rounds of two transactions or more committing concurrently.
    concurrent_rounds: usize,
    /// Database evaluations in the round of the policy created mid-run.
    window_evaluations: u64,
    transactions: usize,
    changes: usize,
    /// Transactions that changed a membership table and a protected table.
    mixed: usize,
    pub(crate) pairs: usize,
    expected: usize,
    delivered: usize,
    pub(crate) leaks: usize,
    pub(crate) misses: usize,
    database_plans: usize,
    plans: usize,
    database_atoms: usize,
    atoms: usize,
    elapsed: Duration,
    /// Time spent waiting for the relay (service_role, database queue, viewers).
    waiting: Duration,
    /// Time spent asking the oracle.
    asking: Duration,
    /// On failure: the seed, schema, plans and first mismatches.
    pub(crate) failure: Option<String>,
}

impl SeedReport {
    /// One line for the test's output.
    pub(crate) fn summary(&self) -> String {
        let concurrency = if self.concurrent {
            format!(
                "; {} rounds of concurrent transactions, {} database evaluations in the round of the policy created \
                 mid-run",
                self.concurrent_rounds, self.window_evaluations
            )
        } else {
            String::new()
        };
        format!(
            "policy_random{} seed {}: {} transactions, {} changes ({} mixing membership and row changes), {} (change, \
             viewer) pairs, {} expected events, {} delivered, {} leaks, {} misses; {}/{} anon/authenticated plans \
             database-evaluated; {}/{} policy atoms of database-only shapes; {:.1} s ({:.1} s asking PostgreSQL, \
             {:.1} s waiting for the relay){concurrency}",
            if self.concurrent { " (concurrent)" } else { "" },
            self.seed,
            self.transactions,
            self.changes,
            self.mixed,
            self.pairs,
            self.expected,
            self.delivered,
            self.leaks,
            self.misses,
            self.database_plans,
            self.plans,
            self.database_atoms,
            self.atoms,
            self.elapsed.as_secs_f64(),
            self.asking.as_secs_f64(),
            self.waiting.as_secs_f64()
        )
    }
}

/// Each (table, role) plan of the generated tables, one line each.
fn plans(relay: &Relay, world: &World) -> (Vec<String>, usize, usize) {
    let set = relay.hub.policies();
    let mut lines = Vec::new();
    let (mut database, mut total) = (0, 0);
    for t in &world.tables {
        let Some(plan) = set.table_by_name("public", &t.name) else {
            lines.push(format!("{}: not published?", t.name));
            continue;
        };
        for role in ["anon", "authenticated"] {
            let Some(p) = plan.role(role) else { continue };
            total += 1;
            let text = match &p.access {
                Access::Nothing(why) => format!("nothing ({why})"),
                Access::Everything => "every row".to_owned(),
                Access::Rows(e) => format!("in memory ({})", e.describe(&plan.columns, &|id| format!("cache#{id}"))),
                Access::Database(why) => {
                    database += 1;
                    format!("database-evaluated ({why})")
                }
            };
            lines.push(format!("{}/{role}: {text}", t.name));
        }
    }
    (lines, database, total)
}

async fn drain_until(outbox: &Outbox, frames: &mut Vec<Bytes>, want: usize, wait: Duration) {
    let deadline = Instant::now() + wait;
    loop {
        outbox.try_drain(frames);
        if parse_frames(frames).len() >= want || Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The world's schema and rows, created through `client`.
async fn create_world(client: &Client, world: &World, seed: u64) {
    client.batch_execute(&world.sql).await.unwrap_or_else(|e| panic!("seed {seed}: schema: {e:?}\n{}", world.sql));
    let mut data = String::new();
    for (t, rows) in world.rows.iter().enumerate() {
        for (id, v) in rows {
            let _ = writeln!(
                data,
                "insert into public.{} ({}) values {};",
                world.tables[t].name,
                v.columns(),
                v.tuple(*id)
            );
        }
    }
    client.batch_execute(&data).await.unwrap_or_else(|e| panic!("seed {seed}: data: {e:?}"));
}

/// Once the relay has installed the policies of the world's tables (the
/// ones that exist), one subscriber per viewer, each live.
async fn subscribe(relay: &Relay, world: &World, seed: u64) -> Vec<Arc<Outbox>> {
    // The relay installs the policies it read once the slot exists.
    let deadline = Instant::now() + Duration::from_secs(30);
    let missing = |t: &TableSpec| t.name != LATE && relay.hub.policies().table_by_name("public", &t.name).is_none();
    while world.tables.iter().any(missing) {
        assert!(Instant::now() < deadline, "seed {seed}: the relay never installed its policies");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let limits = OutboxLimits::default();
    let mut outboxes = Vec::new();
    for (i, v) in world.viewers.iter().enumerate() {
        let outbox = Arc::new(Outbox::new(limits));
        relay.hub.send(Control::Join(subscription(i as u64, world, v.viewer.clone(), &outbox))).await.unwrap();
        outboxes.push(outbox);
    }
    for outbox in &outboxes {
        let mut frames = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while frames.is_empty() {
            assert!(Instant::now() < deadline, "seed {seed}: a subscriber never went live");
            outbox.try_drain(&mut frames);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    outboxes
}

async fn run_seed(seed: u64, transactions: usize) -> SeedReport {
    let (db, client) = migrated_db().await;
    run_seed_on(seed, transactions, db.url(), &format!("{}_s", db.name()), client).await
}

/// One seed on the migrated database at `url` (`client` connected to it),
/// through a relay on `slot`: the version matrix runs seeds on the server
/// under test.
pub(crate) async fn run_seed_on(seed: u64, transactions: usize, url: &str, slot: &str, client: Client) -> SeedReport {
    let started = Instant::now();
    let mut world = generate(seed);
    let mut rng = Rng::new(seed ^ 0xC0FF_EE00);
    create_world(&client, &world, seed).await;

    // The driver commits synchronously (PostgreSQL's default): the relay
    // may receive a commit before PostgreSQL shows it to other sessions, the
    // window the database evaluation's visibility wait closes. With
    // `WALCAST_RANDOM_SYNC_COMMIT=0` it commits asynchronously (the scratch
    // cluster's setting), then flushes the WAL with a synchronous commit of
    // an unpublished table: each transaction reaches the relay at once, and
    // only once it is visible to every new snapshot.
    let sync_commit = env_number("WALCAST_RANDOM_SYNC_COMMIT", 1) == 1;
    client
        .batch_execute(if sync_commit {
            "set synchronous_commit = on"
        } else {
            "create table private.flush (n int); set synchronous_commit = off"
        })
        .await
        .unwrap();
    let relay = start_relay(url, slot).await;
    let outboxes = subscribe(&relay, &world, seed).await;
    let (plan_lines, database_plans, plan_count) = plans(&relay, &world);
    let service = world.viewers.len() - 1;
    let stats = Arc::clone(&relay.hub.stats);

    let mut report = SeedReport {
        seed,
        database_plans,
        plans: plan_count,
        database_atoms: world.database_atoms,
        atoms: world.atoms,
        ..SeedReport::default()
    };
    let mut mismatches: Vec<String> = Vec::new();
    for n in 0..transactions {
        let (sql, made) = random_transaction(&mut rng, &mut world);
        client.batch_execute(&sql).await.unwrap_or_else(|e| panic!("seed {seed} tx {n}: {e:?}\n{sql}"));
        if !sync_commit {
            client
                .batch_execute(
                    "begin; set local synchronous_commit = on; insert into private.flush values (1); commit;",
                )
                .await
                .unwrap();
        }
        // service_role sees every change: once it has them, the hub has
        // judged the whole transaction; then the database checks drain.
        let waited = Instant::now();
        let mut service_frames = Vec::new();
        drain_until(&outboxes[service], &mut service_frames, made.len(), Duration::from_secs(30)).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while stats.database.in_flight.load(Ordering::Acquire) > 0 {
            assert!(Instant::now() < deadline, "seed {seed}: database evaluation never drained");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        report.waiting += waited.elapsed();
        let mut service_got = parse_frames(&service_frames);
        report.changes += made.len();
        report.transactions += 1;
        let membership = |m: &Made| world.tables[m.table].membership;
        if made.iter().any(membership) && !made.iter().all(membership) {
            report.mixed += 1;
        }
        let asked = Instant::now();
        // Pipelined on the one connection.
        let expectations =
            futures::future::join_all(world.viewers.iter().map(|viewer| oracle(&client, &world, viewer, &made))).await;
        report.asking += asked.elapsed();
        let waited = Instant::now();
        for ((v, viewer), expected) in world.viewers.iter().enumerate().zip(expectations) {
            let mut got = if v == service {
                std::mem::take(&mut service_got)
            } else {
                let mut frames = Vec::new();
                // A miss costs the wait: long for the first, short after.
                let wait = if report.misses == 0 { Duration::from_secs(5) } else { Duration::from_millis(200) };
                drain_until(&outboxes[v], &mut frames, expected.len(), wait).await;
                parse_frames(&frames)
            };
            report.pairs += made.len();
            report.expected += expected.len();
            report.delivered += got.len();
            let mut want = expected.clone();
            want.sort();
            got.sort();
            if got != want {
                let mut rest = want.clone();
                for g in &got {
                    match rest.iter().position(|e| e == g) {
                        Some(i) => {
                            rest.remove(i);
                        }
                        None => {
                            report.leaks += 1;
                            mismatches.push(format!("LEAK tx {n}: {} got {g:?}", viewer.label));
                        }
                    }
                }
                for e in rest {
                    report.misses += 1;
                    mismatches.push(format!("MISS tx {n}: {} did not get {e:?}", viewer.label));
                }
                mismatches.push(format!("  tx {n} was: {sql}\n  changes {made:?}\n  claims {}", viewer.claims));
            }
        }
        report.waiting += waited.elapsed();
    }
    // Anything arriving late is a leak.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (v, outbox) in outboxes.iter().enumerate() {
        let mut frames = Vec::new();
        outbox.try_drain(&mut frames);
        for g in parse_frames(&frames) {
            report.leaks += 1;
            mismatches.push(format!("LEAK (late): {} got {g:?}", world.viewers[v].label));
        }
    }
    relay.stop().await.unwrap();
    report.elapsed = started.elapsed();
    if report.leaks + report.misses > 0 {
        let shown: Vec<&str> = mismatches.iter().take(40).map(String::as_str).collect();
        report.failure = Some(format!(
            "seed {seed} ({} leaks, {} misses)\n--- schema\n{}\n--- plans\n{}\n--- first mismatches\n{}",
            report.leaks,
            report.misses,
            world.sql,
            plan_lines.join("\n"),
            shown.join("\n")
        ));
    }
    report
}

/// The membership table the concurrent driver creates while its writers run.
const LATE: &str = "mn";

/// One transaction of a concurrent round.
struct RoundTx {
    label: String,
    statements: Vec<String>,
    made: Vec<Made>,
    /// Undoes its DDL inside the oracle's rolled-back transaction.
    undo: Option<String>,
}

/// Per viewer: the oracle's SQL for a round's transactions in commit order
/// (one round trip). From the state after the last commit it walks back:
/// per transaction, newest first, the SELECT of its new images (the state as
/// of its commit), then its protected rows written back (and its inserted
/// ones deleted) and the SELECT of their old images (memberships still as of
/// its commit), then likewise its membership rows, then its DDL undone: the
/// state as of the previous commit.
fn round_oracle_sql(world: &World, viewer: &ViewerSpec, steps: &[&RoundTx]) -> String {
    let as_viewer = format!(
        "set local role {}; select set_config('request.jwt.claims', {}, true);\n",
        viewer.role,
        quote(&viewer.claims)
    );
    let select = |sql: &mut String, side: &str, k: usize, t: usize, ids: &[Uuid]| {
        let table = &world.tables[t];
        if ids.is_empty() || table.grant(viewer.role) == Grant::None {
            return;
        }
        let _ = writeln!(
            sql,
            "select '{side}', {k}, {t}, id::text from public.{} where id = any({});",
            table.name,
            id_array(ids)
        );
    };
    let mut sql = String::from("begin;\n");
    for (k, step) in steps.iter().enumerate().rev() {
        sql.push_str(&as_viewer);
        for t in 0..world.tables.len() {
            let ids: Vec<Uuid> = step.made.iter().filter(|m| m.table == t && m.op != "DELETE").map(|m| m.id).collect();
            select(&mut sql, "new", k, t, &ids);
        }
        for membership in [false, true] {
            let mut restore = String::new();
            let mut selects = String::new();
            for t in (0..world.tables.len()).filter(|&t| world.tables[t].membership == membership) {
                let touched: Vec<&Made> = step.made.iter().filter(|m| m.table == t).collect();
                if touched.is_empty() {
                    continue;
                }
                let name = &world.tables[t].name;
                let ids: Vec<Uuid> = touched.iter().map(|m| m.id).collect();
                let _ = writeln!(restore, "delete from public.{name} where id = any({});", id_array(&ids));
                let olds: Vec<(Uuid, &Values)> =
                    touched.iter().filter_map(|m| m.old.as_ref().map(|o| (m.id, o))).collect();
                if olds.is_empty() {
                    continue;
                }
                let tuples: Vec<String> = olds.iter().map(|(id, v)| v.tuple(*id)).collect();
                let _ = writeln!(
                    restore,
                    "insert into public.{name} ({}) values {};",
                    olds[0].1.columns(),
                    tuples.join(", ")
                );
                let old_ids: Vec<Uuid> = olds.iter().map(|(id, _)| *id).collect();
                select(&mut selects, "old", k, t, &old_ids);
            }
            if !restore.is_empty() {
                sql.push_str("reset role;\n");
                sql.push_str(&restore);
                sql.push_str(&as_viewer);
                sql.push_str(&selects);
            }
        }
        if let Some(undo) = &step.undo {
            let _ = writeln!(sql, "reset role;\n{undo}");
        }
    }
    sql.push_str("rollback;");
    sql
}

/// Per viewer: the expected `(table, id, event)`s of each of a round's
/// transactions (in commit order).
async fn round_oracle(
    client: &Client,
    world: &World,
    viewer: &ViewerSpec,
    steps: &[&RoundTx],
) -> Vec<Vec<(String, Uuid, String)>> {
    let sql = round_oracle_sql(world, viewer, steps);
    let messages = client.simple_query(&sql).await.unwrap_or_else(|e| panic!("oracle query failed: {e:?}\n{sql}"));
    let mut new = BTreeSet::new();
    let mut old = BTreeSet::new();
    for m in messages {
        if let SimpleQueryMessage::Row(row) = m {
            if row.len() != 4 {
                continue;
            }
            let k: usize = row.get(1).unwrap().parse().unwrap();
            let t: usize = row.get(2).unwrap().parse().unwrap();
            let id = Uuid::parse_str(row.get(3).unwrap()).unwrap();
            match row.get(0) {
                Some("new") => new.insert((k, t, id)),
                _ => old.insert((k, t, id)),
            };
        }
    }
    steps
        .iter()
        .enumerate()
        .map(|(k, step)| {
            step.made
                .iter()
                .filter_map(|m| {
                    let event = transition(m.op, old.contains(&(k, m.table, m.id)), new.contains(&(k, m.table, m.id)))?;
                    Some((world.tables[m.table].name.clone(), m.id, event.to_owned()))
                })
                .collect()
        })
        .collect()
}

/// The tables a role's plan has PostgreSQL evaluate.
fn database_tables(relay: &Relay, world: &World) -> BTreeSet<usize> {
    let set = relay.hub.policies();
    (0..world.tables.len())
        .filter(|&t| {
            set.table_by_name("public", &world.tables[t].name).is_some_and(|plan| {
                ["anon", "authenticated"]
                    .iter()
                    .any(|role| plan.role(role).is_some_and(|p| matches!(p.access, Access::Database(_))))
            })
        })
        .collect()
}

/// Runs one transaction on its own connection: each statement, a short
/// pause (so the round's transactions interleave), its xid, COMMIT. Returns
/// the 32-bit xid (as logical decoding shows it).
async fn commit_tx(client: &Client, tx: &RoundTx, pauses: &[u64]) -> String {
    let fail = |e: tokio_postgres::Error| -> ! {
        panic!("{}: {e:?}\n{}", tx.label, tx.statements.concat());
    };
    client.batch_execute("begin").await.unwrap_or_else(|e| fail(e));
    for (statement, &pause) in tx.statements.iter().zip(pauses) {
        client.batch_execute(statement).await.unwrap_or_else(|e| fail(e));
        tokio::time::sleep(Duration::from_micros(pause)).await;
    }
    let row = client.query_one("select (txid_current() % 4294967296)::text", &[]).await.unwrap_or_else(|e| fail(e));
    client.batch_execute("commit").await.unwrap_or_else(|e| fail(e));
    row.get(0)
}

async fn run_concurrent_seed(seed: u64, rounds: usize) -> SeedReport {
    let (db, mut client) = migrated_db().await;
    // The event trigger: policy changes apply from their commit, in WAL order.
    schema::migrate(&mut client, &Migrations::walcast()).await.expect("walcast setup");
    let started = Instant::now();
    let mut world = generate(seed);
    let mut rng = Rng::new(seed ^ 0xC0FF_EE00);
    create_world(&client, &world, seed).await;

    // The late membership table: in the model (and in the subscriptions)
    // from the start, in the database from round `create_round` on.
    let late = world.tables.len();
    world.tables.push(TableSpec {
        name: LATE.to_owned(),
        membership: true,
        anon: Grant::Table,
        authenticated: Grant::Table,
    });
    world.rows.push(BTreeMap::new());
    world.reads.push(BTreeSet::new());
    let protected: Vec<usize> = (0..late).filter(|&t| !world.tables[t].membership).collect();
    let target = rng.pick(&protected);
    let target_name = world.tables[target].name.clone();
    let condition = rng.pick(&["", " and m.accepted", " and m.role in ('admin', 'owner')"]);
    let using = if rng.chance(50) {
        format!(
            "exists (select 1 from public.{LATE} m where m.group_id = {target_name}.grp and m.user_id = (select \
             auth.uid()){condition})"
        )
    } else {
        format!("grp in (select m.group_id from public.{LATE} m where m.user_id = (select auth.uid()){condition})")
    };
    let create_sql = format!(
        "create table public.{LATE} (id uuid primary key, user_id uuid not null, group_id uuid not null, role text \
         not null, accepted boolean not null);
alter table public.{LATE} replica identity full;
grant select on public.{LATE} to anon, authenticated, service_role;
alter publication supabase_realtime add table public.{LATE};\n"
    );
    let policy_sql = format!(
        "create policy late on public.{target_name} as permissive for select to authenticated using ({using});\n"
    );
    let (create_round, seed_round, policy_round) = (rounds / 4, rounds / 4 + 1, rounds / 2);

    // Commit order, read back from the WAL: a second slot (pgoutput over the
    // SQL interface); its COMMIT messages ('C') come in commit order, each
    // with its transaction's xid.
    let order_slot = format!("{}_o", db.name());
    client.execute("select pg_create_logical_replication_slot($1, 'pgoutput')", &[&order_slot]).await.unwrap();
    let mut writers = Vec::new();
    for _ in 0..5 {
        let writer = db.connect().await.expect("writer connects");
        writer.batch_execute("set synchronous_commit = on").await.unwrap();
        writers.push(writer);
    }

    let relay = start_relay(db.url(), &format!("{}_s", db.name())).await;
    let outboxes = subscribe(&relay, &world, seed).await;
    let (plan_lines, database_plans, plan_count) = plans(&relay, &world);
    let database = database_tables(&relay, &world);
    let service = world.viewers.len() - 1;
    let stats = Arc::clone(&relay.hub.stats);
    let mut report = SeedReport {
        seed,
        concurrent: true,
        database_plans,
        plans: plan_count,
        database_atoms: world.database_atoms,
        atoms: world.atoms,
        ..SeedReport::default()
    };
    let mut mismatches: Vec<String> = Vec::new();
    let mut failed_rounds = BTreeSet::new();
    for r in 0..rounds {
        // Tables PostgreSQL evaluates read the membership tables as of the
        // evaluation, not the commit (docs/policies.md): each such table and
        // the membership tables it reads form a group that one transaction
        // of a round at most may touch. The policy's table is such a table
        // in the policy's round: PostgreSQL evaluates it until the stream
        // passes the position read after the new cache's load (below).
        let mut groups: Vec<BTreeSet<usize>> = database
            .iter()
            .filter(|&&t| !world.reads[t].is_empty())
            .map(|&t| world.reads[t].iter().copied().chain([t]).collect())
            .collect();
        if r == policy_round {
            groups.push(world.reads[target].iter().copied().chain([target, late]).collect());
        }
        let mut claims: BTreeMap<usize, usize> = BTreeMap::new();
        if r == policy_round {
            // The policy's group is the window transaction's (below).
            claims.insert(groups.len() - 1, usize::MAX);
        }
        let mut taken = BTreeSet::new();
        let mut txs: Vec<RoundTx> = Vec::new();
        for w in 0..rng.range(2, 3) {
            let allowed = |t: usize| {
                (t != late || r > create_round)
                    && groups
                        .iter()
                        .enumerate()
                        .all(|(g, set)| !set.contains(&t) || claims.get(&g).is_none_or(|&o| o == w))
            };
            let (statements, made) = random_statements(&mut rng, &mut world, &allowed, &taken);
            if made.is_empty() {
                continue;
            }
            for m in &made {
                taken.insert(m.id);
                for (g, set) in groups.iter().enumerate() {
                    if set.contains(&m.table) {
                        claims.insert(g, w);
                    }
                }
            }
            txs.push(RoundTx { label: format!("round {r} writer {w}"), statements, made, undo: None });
        }
        if r == create_round {
            txs.push(RoundTx {
                label: format!("round {r}: create {LATE}"),
                statements: vec![create_sql.clone()],
                made: Vec::new(),
                undo: None,
            });
        }
        if r == seed_round {
            let mut statements = Vec::new();
            let mut made = Vec::new();
            for _ in 0..rng.range(6, 10) {
                let id = rng.uuid();
                let values = Values::M(MemRow {
                    user: rng.pick(&world.users),
                    group: rng.pick(&world.groups),
                    role: rng.pick(&MEMBER_ROLES),
                    accepted: rng.chance(70),
                });
                statements.push(format!(
                    "insert into public.{LATE} ({}) values {};\n",
                    values.columns(),
                    values.tuple(id)
                ));
                world.rows[late].insert(id, values);
                made.push(Made { table: late, op: "INSERT", id, old: None });
            }
            txs.push(RoundTx { label: format!("round {r}: fill {LATE}"), statements, made, undo: None });
        }
        if r == policy_round {
            // Right after the policy: a transaction whose writes to the
            // policy's table wait for the policy's lock (taken while this one
            // sleeps), so it commits just after the policy, before walcast
            // can have loaded the new cache: in the window.
            let mut statements = vec!["select pg_sleep(0.02);\n".to_owned()];
            let mut made = Vec::new();
            let id = rng.uuid();
            let values = Values::P(random_row(&mut rng, &world.users, &world.groups));
            statements.push(format!(
                "insert into public.{target_name} ({}) values {};\n",
                values.columns(),
                values.tuple(id)
            ));
            world.rows[target].insert(id, values);
            made.push(Made { table: target, op: "INSERT", id, old: None });
            let existing: Vec<Uuid> = world.rows[target].keys().copied().filter(|&i| i != id).collect();
            if !existing.is_empty() {
                let id = rng.pick(&existing);
                let new = Values::P(random_row(&mut rng, &world.users, &world.groups));
                statements.push(format!("update public.{target_name} set {} where id = '{id}';\n", new.assignments()));
                let old = world.rows[target].insert(id, new);
                made.push(Made { table: target, op: "UPDATE", id, old });
            }
            txs.push(RoundTx { label: format!("round {r}: right after the policy"), statements, made, undo: None });
            // From now on the policy's table reads the late table.
            world.reads[target].insert(late);
            txs.push(RoundTx {
                label: format!("round {r}: the policy"),
                statements: vec![policy_sql.clone()],
                made: Vec::new(),
                undo: Some(format!("drop policy late on public.{target_name};")),
            });
        }
        if txs.len() > 1 {
            report.concurrent_rounds += 1;
        }
        let reloads = stats.policy_reloads.load(Ordering::Relaxed);
        let evaluated = stats.database.evaluated.load(Ordering::Relaxed);
        let pauses: Vec<Vec<u64>> =
            txs.iter().map(|tx| tx.statements.iter().map(|_| rng.below(1500) as u64).collect()).collect();
        let xids = futures::future::join_all(
            txs.iter().zip(&writers).zip(&pauses).map(|((tx, writer), pauses)| commit_tx(writer, tx, pauses)),
        )
        .await;
        let committed: Vec<String> = client
            .query(
                "select xid::text from pg_logical_slot_get_binary_changes($1, null, null, 'proto_version', '1', \
                 'publication_names', 'supabase_realtime', 'messages', 'true') where get_byte(data, 0) = 67",
                &[&order_slot],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        let order: Vec<usize> = committed.iter().filter_map(|x| xids.iter().position(|y| y == x)).collect();
        assert_eq!(
            order.len(),
            txs.len(),
            "seed {seed} round {r}: commit order {committed:?} does not hold every xid of {xids:?}"
        );
        let steps: Vec<&RoundTx> = order.iter().map(|&i| &txs[i]).collect();
        let changes: usize = steps.iter().map(|s| s.made.len()).sum();

        let waited = Instant::now();
        let mut service_frames = Vec::new();
        drain_until(&outboxes[service], &mut service_frames, changes, Duration::from_secs(30)).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while stats.database.in_flight.load(Ordering::Acquire) > 0 {
            assert!(Instant::now() < deadline, "seed {seed}: database evaluation never drained");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if r == policy_round {
            // The policy's reload (its new cache loaded, then the WAL insert
            // position read): every later round commits after that position,
            // so its cache is exact for them and the policy's table is back
            // in memory (or as planned).
            let deadline = Instant::now() + Duration::from_secs(30);
            while stats.policy_reloads.load(Ordering::Relaxed) <= reloads {
                assert!(Instant::now() < deadline, "seed {seed}: no reload after the policy");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            report.window_evaluations = stats.database.evaluated.load(Ordering::Relaxed) - evaluated;
        }
        report.waiting += waited.elapsed();
        let mut service_got = parse_frames(&service_frames);
        report.changes += changes;
        report.transactions += steps.len();
        for step in &steps {
            let membership = |m: &Made| world.tables[m.table].membership;
            if step.made.iter().any(membership) && !step.made.iter().all(membership) {
                report.mixed += 1;
            }
        }
        let asked = Instant::now();
        let expectations =
            futures::future::join_all(world.viewers.iter().map(|viewer| round_oracle(&client, &world, viewer, &steps)))
                .await;
        report.asking += asked.elapsed();
        let waited = Instant::now();
        for ((v, viewer), per_step) in world.viewers.iter().enumerate().zip(expectations) {
            let expected: Vec<(String, Uuid, String)> = per_step.iter().flatten().cloned().collect();
            let mut got = if v == service {
                std::mem::take(&mut service_got)
            } else {
                let mut frames = Vec::new();
                let wait = if report.misses == 0 { Duration::from_secs(5) } else { Duration::from_millis(200) };
                drain_until(&outboxes[v], &mut frames, expected.len(), wait).await;
                parse_frames(&frames)
            };
            report.pairs += changes;
            report.expected += expected.len();
            report.delivered += got.len();
            let mut want = expected.clone();
            want.sort();
            got.sort();
            if got != want {
                let step_of =
                    |id: &Uuid| steps.iter().position(|s| s.made.iter().any(|m| m.id == *id)).map_or(usize::MAX, |k| k);
                let mut rest = want.clone();
                for g in &got {
                    match rest.iter().position(|e| e == g) {
                        Some(i) => {
                            rest.remove(i);
                        }
                        None => {
                            report.leaks += 1;
                            mismatches.push(format!(
                                "LEAK round {r} commit #{}: {} got {g:?}",
                                step_of(&g.1),
                                viewer.label
                            ));
                        }
                    }
                }
                for e in rest {
                    report.misses += 1;
                    mismatches.push(format!(
                        "MISS round {r} commit #{}: {} did not get {e:?}",
                        step_of(&e.1),
                        viewer.label
                    ));
                }
                let mut shown = String::new();
                for (k, step) in steps.iter().enumerate() {
                    let _ = write!(
                        shown,
                        "\n  commit #{k} ({}):\n{}  changes {:?}",
                        step.label,
                        step.statements.concat(),
                        step.made
                    );
                }
                mismatches.push(format!("  round {r} in commit order:{shown}\n  claims {}", viewer.claims));
                failed_rounds.insert(r);
            }
        }
        report.waiting += waited.elapsed();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (v, outbox) in outboxes.iter().enumerate() {
        let mut frames = Vec::new();
        outbox.try_drain(&mut frames);
        for g in parse_frames(&frames) {
            report.leaks += 1;
            mismatches.push(format!("LEAK (late): {} got {g:?}", world.viewers[v].label));
        }
    }
    let (end_plans, ..) = plans(&relay, &world);
    let counters = format!(
        "policy reloads {}, catch-up transactions {}, database evaluations {}, database-denied {}, caches {:?}",
        stats.policy_reloads.load(Ordering::Relaxed),
        stats.catch_up_transactions.load(Ordering::Relaxed),
        stats.database.evaluated.load(Ordering::Relaxed),
        stats.database_denied.load(Ordering::Relaxed),
        stats.caches.lock().map(|c| c.clone()).unwrap_or_default()
    );
    relay.stop().await.unwrap();
    client.execute("select pg_drop_replication_slot($1)", &[&order_slot]).await.unwrap();
    report.elapsed = started.elapsed();
    if report.leaks + report.misses > 0 {
        let shown: Vec<&str> = mismatches.iter().take(40).map(String::as_str).collect();
        report.failure = Some(format!(
            "seed {seed} (concurrent; {} leaks, {} misses in rounds {:?})\n--- schema\n{}\n--- at round \
             {create_round}\n{create_sql}--- at round {policy_round}\n{policy_sql}--- plans at the start\n{}\n--- \
             plans at the end\n{}\n--- {counters}\n--- first mismatches\n{}",
            report.leaks,
            report.misses,
            failed_rounds,
            world.sql,
            plan_lines.join("\n"),
            end_plans.join("\n"),
            shown.join("\n")
        ));
    }
    report
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Prints the totals of `reports` under `label` and fails on any seed's
/// failure (or a missing seed).
fn check_reports(label: &str, reports: &[SeedReport], seeds: u64, started: Instant) {
    let failures: Vec<&str> = reports.iter().filter_map(|r| r.failure.as_deref()).collect();
    let pairs: usize = reports.iter().map(|r| r.pairs).sum();
    let leaks: usize = reports.iter().map(|r| r.leaks).sum();
    let misses: usize = reports.iter().map(|r| r.misses).sum();
    println!(
        "{label}: {pairs} (change, viewer) pairs, {leaks} leaks, {misses} misses, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert_eq!(reports.len() as u64, seeds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_schemas_deliver_exactly_what_postgres_rls_allows() {
    let seeds = env_number("WALCAST_RANDOM_SEEDS", 10);
    let first = env_number("WALCAST_RANDOM_SEED", 1);
    let transactions = env_number("WALCAST_RANDOM_TXS", 150) as usize;
    let parallel = env_number("WALCAST_RANDOM_PARALLEL", 2).max(1) as usize;
    let started = Instant::now();
    // Each seed's line as it finishes (long runs take minutes).
    let reports: Vec<SeedReport> = futures::stream::iter(first..first + seeds)
        .map(|seed| run_seed(seed, transactions))
        .buffer_unordered(parallel)
        .inspect(|r| println!("{}", r.summary()))
        .collect()
        .await;
    check_reports(&format!("policy_random: {seeds} seeds × {transactions} transactions"), &reports, seeds, started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_and_a_policy_created_mid_run_deliver_exactly_what_postgres_rls_allows() {
    let seeds = env_number("WALCAST_CONCURRENT_SEEDS", 6);
    let first = env_number("WALCAST_CONCURRENT_SEED", 1001);
    let rounds = env_number("WALCAST_CONCURRENT_ROUNDS", 60) as usize;
    let parallel = env_number("WALCAST_RANDOM_PARALLEL", 2).max(1) as usize;
    let started = Instant::now();
    let reports: Vec<SeedReport> = futures::stream::iter(first..first + seeds)
        .map(|seed| run_concurrent_seed(seed, rounds))
        .buffer_unordered(parallel)
        .inspect(|r| println!("{}", r.summary()))
        .collect()
        .await;
    check_reports(&format!("policy_random (concurrent): {seeds} seeds × {rounds} rounds"), &reports, seeds, started);
}
