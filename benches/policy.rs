//! Compiled policies, in memory (no PostgreSQL, no sockets):
//! `cargo bench --bench policy` (short: `cargo bench --bench policy -- --warm-up-time 1 --measurement-time 3`).
//!
//! - Before criterion runs, the **owner fan-out ratio** (issue 14 §2): a hub
//!   with 100 and with 10,000 subscribers of an owner-policy table
//!   (`(select auth.uid()) = user_id`, one user each), each change reaching
//!   exactly one of them; hub time per single-change transaction through
//!   [`Core::stage`], 20,000 transactions per round, the two sizes
//!   alternating for 5 rounds; medians and their ratio (goal ≤ 1.5).
//!   `WALCAST_BENCH_ROUNDS` changes the rounds; `WALCAST_BENCH_LARGE_ONLY=1`
//!   runs the 10,000 case alone (for a profile).
//! - `policy_eval/<shape>`: one evaluation of a compiled predicate on a row
//!   for one viewer — owner, JWT claim, membership (cache lookup), and
//!   `owner OR membership` — the plans coming out of the policy compiler
//!   from the `pg_get_expr` text PostgreSQL stores.

#![allow(missing_docs)] // criterion_group! generates an undocumented pub fn

use std::collections::{BTreeSet, HashMap};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, Criterion};
use uuid::Uuid;
use walcast::change::{Change, ColumnInfo, Datum, Op, RelationInfo, Row, TxBegin, TxEvent, TxInfo};
use walcast::hub::{hub, Binding, Control, EventMatch, HubConfig, Outbox, OutboxLimits, StageEvent, Subscription, Vsn};
use walcast::lsn::Lsn;
use walcast::pgoutput::{PgTimestamp, ReplicaIdentity};
use walcast::policy::catalog::{Catalog, ColumnCat, PolicyCat, Privileges, RoleCat, TableCat};
use walcast::policy::plan::Loaded;
use walcast::policy::predicate::{CacheId, CastError, ClaimPath, ColType, Context, Expr, Scalar};
use walcast::policy::{Access, Caches, Filter, LoadedAt, PolicySet, Viewer};
use walcast::replication::AckHandle;

const TODOS: u32 = 100;
const PROJECTS: u32 = 101;
const TENANTS: u32 = 102;
const COMBO: u32 = 103;
const MEMBERS: u32 = 104;

fn column(name: &str, ty: &str, primary_key: bool) -> ColumnCat {
    ColumnCat { name: name.into(), type_name: ty.into(), sql_type: ty.into(), primary_key }
}

fn table(oid: u32, name: &str, columns: Vec<ColumnCat>, using: &str) -> TableCat {
    TableCat {
        oid,
        schema: "public".into(),
        name: name.into(),
        rls: !using.is_empty(),
        force_rls: false,
        replica_identity: 'f',
        published: true,
        columns,
        policies: if using.is_empty() {
            vec![]
        } else {
            vec![PolicyCat {
                name: format!("{name}_read"),
                permissive: true,
                roles: vec!["authenticated".into()],
                using: Some(using.into()),
            }]
        },
    }
}

/// Four tables, one shape each, with the text `pg_get_expr` gives for them.
fn catalog() -> Catalog {
    let owner = "(( SELECT auth.uid() AS uid) = user_id)";
    let member =
        "(team_id IN ( SELECT m.team_id FROM public.members m WHERE (m.user_id = ( SELECT auth.uid() AS uid))))";
    let tables = vec![
        table(TODOS, "todos", vec![column("id", "uuid", true), column("user_id", "uuid", false)], owner),
        table(PROJECTS, "projects", vec![column("id", "uuid", true), column("team_id", "uuid", false)], member),
        table(
            TENANTS,
            "tenants",
            vec![column("id", "uuid", true), column("org_id", "uuid", false)],
            "(org_id = (((( SELECT auth.jwt() AS jwt) -> 'app_metadata'::text) ->> 'org'::text))::uuid)",
        ),
        table(
            COMBO,
            "combo",
            vec![column("id", "uuid", true), column("user_id", "uuid", false), column("team_id", "uuid", false)],
            &format!("({owner} OR {member})"),
        ),
        table(
            MEMBERS,
            "members",
            vec![column("id", "uuid", true), column("user_id", "uuid", false), column("team_id", "uuid", false)],
            "",
        ),
    ];
    let role = |name: &str| RoleCat {
        name: name.into(),
        superuser: false,
        bypass_rls: false,
        member_of: BTreeSet::from([name.to_owned()]),
        settable: true,
    };
    let mut privileges = HashMap::new();
    for t in &tables {
        privileges.insert(
            ("authenticated".to_owned(), t.oid),
            Privileges { table: true, columns: vec![true; t.columns.len()], owner: false },
        );
    }
    Catalog {
        tables: tables.into_iter().map(|t| (t.oid, t)).collect(),
        roles: HashMap::from([("authenticated".to_owned(), role("authenticated"))]),
        privileges,
        functions: HashMap::new(),
        current_user: "walcast".into(),
    }
}

fn relation(oid: u32, name: &str, columns: &[&str]) -> Arc<RelationInfo> {
    Arc::new(RelationInfo {
        oid,
        schema: "public".into(),
        table: name.into(),
        replica_identity: ReplicaIdentity::Full,
        columns: columns
            .iter()
            .map(|c| ColumnInfo {
                name: (*c).into(),
                type_name: "uuid".into(),
                type_oid: 2950,
                is_key: true,
                kind: walcast::change::value::kind_of(2950),
            })
            .collect(),
    })
}

fn uuid_datum(u: Uuid) -> Datum {
    Datum::Text(Bytes::from(u.to_string()))
}

fn insert(rel: &Arc<RelationInfo>, values: Vec<Uuid>) -> Change {
    Change {
        relation: Arc::clone(rel),
        op: Op::Insert,
        record: Some(Row(values.into_iter().map(uuid_datum).collect())),
        old_record: None,
        missing_toast: vec![],
    }
}

fn compiled() -> (PolicySet, Caches) {
    let (set, specs, wanted) = PolicySet::compile(&catalog());
    assert!(wanted.tables.is_empty() && wanted.functions.is_empty(), "{wanted:?}");
    (set, Caches::new(specs))
}

// ---------------------------------------------------------------------------
// Owner fan-out ratio

fn owner_hub_time_per_change(subscribers: usize, transactions: usize) -> Duration {
    let (set, caches) = compiled();
    let (mut hub, _handle) = hub(HubConfig::default(), AckHandle::default(), walcast::spill::Spill::temporary());
    let core = hub.core_mut();
    let users: Vec<Uuid> = (0..subscribers).map(|i| Uuid::from_u128(0xab00_0000 + i as u128)).collect();
    let mut outboxes = Vec::with_capacity(subscribers);
    for (i, &u) in users.iter().enumerate() {
        let outbox = Arc::new(Outbox::new(OutboxLimits::default()));
        core.control(Control::Join(Subscription {
            conn: i as u64,
            topic: "realtime:todos".into(),
            vsn: Vsn::V2,
            viewer: Viewer::user(u),
            bindings: vec![Binding {
                id: 1,
                schema: Some("public".into()),
                table: Some("todos".into()),
                event: EventMatch::All,
                filter: Filter::default(),
                select: None,
            }],
            outbox: Arc::clone(&outbox),
            on_live: None,
            on_withheld: None,
        }));
        outboxes.push(outbox);
    }
    let loaded = Loaded {
        policies: Arc::new(set),
        caches,
        at: LoadedAt { lsn: Lsn::ZERO, exact: true, rows: 0 },
        catalog: None,
    };
    core.stage(StageEvent::Policies(Box::new(loaded))).expect("install");
    let rel = relation(TODOS, "todos", &["id", "user_id"]);
    let mut rng = 0x5eed_u64;
    let changes: Vec<Change> = (0..transactions)
        .map(|i| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            insert(&rel, vec![Uuid::from_u128(i as u128), users[(rng % subscribers as u64) as usize]])
        })
        .collect();
    let mut scratch = Vec::new();
    let mut elapsed = Duration::ZERO;
    for (i, change) in changes.into_iter().enumerate() {
        let lsn = 0x100_0000 + 16 * i as u64;
        let started = Instant::now();
        core.stage(StageEvent::Tx(TxEvent::Begin(TxBegin {
            xid: 1,
            commit_lsn: Lsn(lsn),
            commit_timestamp: PgTimestamp(0),
        })))
        .expect("begin");
        core.stage(StageEvent::Tx(TxEvent::Change(change))).expect("change");
        core.stage(StageEvent::Tx(TxEvent::Commit(TxInfo {
            xid: 1,
            commit_lsn: Lsn(lsn),
            end_lsn: Lsn(lsn + 8),
            commit_timestamp: PgTimestamp(0),
        })))
        .expect("commit");
        elapsed += started.elapsed();
        if i % 1024 == 0 {
            for o in &outboxes {
                o.try_drain(&mut scratch);
            }
            scratch.clear();
        }
    }
    let delivered: usize = outboxes
        .iter()
        .map(|o| {
            let mut v = Vec::new();
            o.try_drain(&mut v);
            v.len()
        })
        .sum();
    black_box(delivered);
    elapsed / transactions as u32
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn owner_fanout_ratio() {
    let rounds: usize = std::env::var("WALCAST_BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    // `WALCAST_BENCH_LARGE_ONLY=1`: the 10,000 case alone (for a profile).
    let large_only = std::env::var("WALCAST_BENCH_LARGE_ONLY").is_ok_and(|v| v == "1");
    let (mut small, mut large) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        if !large_only {
            small.push(owner_hub_time_per_change(100, 20_000));
        }
        large.push(owner_hub_time_per_change(10_000, 20_000));
    }
    if large_only {
        eprintln!("owner fan-out, 10,000 subscribers: {:.2} µs per change", median(large).as_secs_f64() * 1e6);
        return;
    }
    let (s, l) = (median(small), median(large));
    eprintln!(
        "owner fan-out: hub time per change {:.2} µs with 100 subscribers, {:.2} µs with 10,000 (ratio {:.2}; {rounds} \
         alternating rounds of 20,000 single-change transactions, medians)",
        s.as_secs_f64() * 1e6,
        l.as_secs_f64() * 1e6,
        l.as_secs_f64() / s.as_secs_f64()
    );
}

// ---------------------------------------------------------------------------
// Per-shape evaluation

/// As the hub evaluates: the claims the plans read resolved once per
/// viewer (at join), the JSON only as a fallback.
struct Ctx<'a> {
    row: &'a [Datum],
    claims: &'a serde_json::Value,
    resolved: &'a [(ClaimPath, ColType, Option<Scalar>)],
    caches: &'a Caches,
}

impl Context for Ctx<'_> {
    fn column(&self, index: usize) -> &Datum {
        &self.row[index]
    }
    fn claims(&self) -> &serde_json::Value {
        self.claims
    }
    fn claim(&self, path: &ClaimPath, ty: ColType) -> Result<Option<Scalar>, CastError> {
        match self.resolved.iter().find(|(p, t, _)| *t == ty && p == path) {
            Some((_, _, v)) => Ok(v.clone()),
            None => path.value(self.claims, ty),
        }
    }
    fn member(&self, cache: CacheId, outer: Option<&Scalar>, user: &Scalar) -> bool {
        self.caches.member(cache, outer, user)
    }
    fn user_rows(&self, cache: CacheId, user: &Scalar) -> (bool, bool) {
        self.caches.user_rows(cache, user)
    }
}

fn bench_eval(c: &mut Criterion) {
    let (set, mut caches) = compiled();
    let user = Uuid::from_u128(7);
    let team = Uuid::from_u128(8);
    let members = relation(MEMBERS, "members", &["id", "user_id", "team_id"]);
    // 10,000 memberships, the viewer's among them.
    for i in 0..10_000u128 {
        let (u, t) =
            if i == 0 { (user, team) } else { (Uuid::from_u128(1000 + i), Uuid::from_u128(900_000 + i % 997)) };
        caches.apply(&insert(&members, vec![Uuid::from_u128(5_000_000 + i), u, t]));
    }
    let claims = serde_json::json!({"role": "authenticated", "sub": user.to_string(), "app_metadata": {"org": team.to_string()}});
    let expr = |oid: u32| -> Expr {
        match &set.table(oid).expect("table").role("authenticated").expect("role").access {
            Access::Rows(e) => e.clone(),
            other => panic!("{oid}: {other:?}"),
        }
    };
    let resolved: Vec<(ClaimPath, ColType, Option<Scalar>)> =
        set.indexed_claims().iter().map(|(p, t)| (p.clone(), *t, p.value(&claims, *t).expect("claims cast"))).collect();
    let mut group = c.benchmark_group("policy_eval");
    let cases: [(&str, u32, Vec<Datum>); 4] = [
        ("owner", TODOS, vec![uuid_datum(Uuid::from_u128(1)), uuid_datum(user)]),
        ("claim", TENANTS, vec![uuid_datum(Uuid::from_u128(1)), uuid_datum(team)]),
        ("membership", PROJECTS, vec![uuid_datum(Uuid::from_u128(1)), uuid_datum(team)]),
        (
            "owner_or_membership",
            COMBO,
            vec![uuid_datum(Uuid::from_u128(1)), uuid_datum(Uuid::from_u128(99)), uuid_datum(team)],
        ),
    ];
    for (name, oid, row) in cases {
        let e = expr(oid);
        let ctx = Ctx { row: &row, claims: &claims, resolved: &resolved, caches: &caches };
        assert!(e.eval(&ctx).visible(), "{name}: the viewer sees the row");
        group.bench_function(name, |b| b.iter(|| black_box(e.eval(black_box(&ctx)))));
    }
    group.finish();
}

criterion_group!(benches, bench_eval);

fn main() {
    owner_fanout_ratio();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
