//! The hub's subscription registry: one type that owns the subscriptions
//! and every index over them, so inserts and removals keep them in step.
//!
//! Sits inside the hub task (single-threaded, no locks). Indexes:
//!
//! - `by_key`: (connection, topic) → slot — a connection has at most one
//!   subscription per topic;
//! - `by_conn`: connection → its slots;
//! - `by_table`: schema → table → the slots with a binding naming that
//!   table, split for the filter index: `open` (some binding on the table
//!   has no filter, or one without an `eq`/`in` condition an index can look
//!   up) and, per filtered column, key → slots (every other slot, under each
//!   key of each of its bindings' index conditions) — so a change reaches
//!   the subscribers its values may match, not every filtered binding;
//!   `wildcard`: slots with a binding on a whole schema or every schema;
//! - `by_claim`: for each claim the policies look viewers up by (e.g. `sub`
//!   as uuid), claim value → slots — so a change reaches its candidates
//!   without visiting every subscriber;
//! - `roles`: role → number of subscriptions (the roles a change is judged
//!   for).
//!
//! # Invariants ([`Registry::check`] verifies them in debug builds and tests)
//!
//! 1. A slot is live iff it is `Some`; free slots are exactly those in
//!    `free`, each once.
//! 2. Every live slot appears once in `by_key` (under its own key), once in
//!    `by_conn[conn]`, once in `by_table` per distinct table its bindings
//!    name (in that table's `open`, or under each of its distinct index
//!    keys there, never both) or once in `wildcard`, and once in
//!    `by_claim[c][v]` per indexed
//!    claim `c` whose value `v` it has, and is counted once under its role;
//!    and no index holds anything else.
//! 3. Topic ids are stable while a topic has a subscription; the frame
//!    cache keys on them (never on an address).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;

use super::{Binding, ConnId, Outbox, Subscription, Vsn};
use crate::change::Change;
use crate::policy::predicate::{CastError, ClaimPath, ColType, Scalar};
use crate::policy::{KeyKind, Viewer};

/// Debug builds verify the invariants after every change of a registry of
/// at most this many subscriptions (and 16 times as many filter keys).
#[cfg(debug_assertions)]
const DEBUG_CHECK_MAX_SUBSCRIPTIONS: usize = 32;

/// Index of a subscription in the registry.
pub type Slot = usize;

/// A registered subscription.
#[derive(Debug)]
pub struct Sub {
    /// The connection.
    pub conn: ConnId,
    /// The topic.
    pub topic: Arc<str>,
    /// Stable id of the topic (frame cache key).
    pub topic_id: u32,
    /// The socket's serializer.
    pub vsn: Vsn,
    /// Who is looking.
    pub viewer: Viewer,
    /// Bindings, in join order.
    pub bindings: Vec<Binding>,
    /// The connection's outbox.
    pub outbox: Arc<Outbox>,
    /// The viewer's value of each indexed claim (registry order), resolved
    /// once: the fan-out reads these instead of the claims' JSON.
    claim_values: Vec<ClaimValue>,
    /// The "changes withheld" notice, until it has been sent once.
    withheld: Option<Bytes>,
}

/// The registry.
#[derive(Debug, Default)]
pub struct Registry {
    slots: Vec<Option<Sub>>,
    free: Vec<Slot>,
    by_key: HashMap<(ConnId, Arc<str>), Slot>,
    by_conn: HashMap<ConnId, Vec<Slot>>,
    by_table: HashMap<Arc<str>, HashMap<Arc<str>, TableSubs>>,
    wildcard: Vec<Slot>,
    claims: Vec<(ClaimPath, ColType)>,
    by_claim: Vec<HashMap<Scalar, Vec<Slot>>>,
    topics: HashMap<Arc<str>, (u32, usize)>,
    next_topic: u32,
    roles: HashMap<Arc<str>, usize>,
}

/// The subscriptions naming one table, as the filter index sees them.
#[derive(Debug, Default)]
struct TableSubs {
    /// Slots the index cannot narrow: candidates for every change.
    open: Vec<Slot>,
    /// Per filtered column and key kind: key → slots.
    columns: Vec<ColumnKeys>,
}

#[derive(Debug)]
struct ColumnKeys {
    column: Box<str>,
    kind: KeyKind,
    /// A set per key: a popular value may name thousands of slots, and a
    /// removal must not scan them.
    keys: HashMap<Box<[u8]>, HashSet<Slot>>,
}

impl TableSubs {
    fn is_empty(&self) -> bool {
        self.open.is_empty() && self.columns.is_empty()
    }

    fn len(&self) -> usize {
        self.open.len() + self.columns.iter().flat_map(|c| c.keys.values()).map(HashSet::len).sum::<usize>()
    }

    fn add(&mut self, slot: Slot, route: &Route) {
        match route {
            Route::Open => self.open.push(slot),
            Route::Keys(keys) => {
                for (column, kind, key) in keys {
                    let i = match self.columns.iter().position(|c| c.column == *column && c.kind == *kind) {
                        Some(i) => i,
                        None => {
                            self.columns.push(ColumnKeys { column: column.clone(), kind: *kind, keys: HashMap::new() });
                            self.columns.len() - 1
                        }
                    };
                    self.columns[i].keys.entry(key.clone()).or_default().insert(slot);
                }
            }
        }
    }

    fn drop(&mut self, slot: Slot, route: &Route) {
        match route {
            Route::Open => drop_slot(&mut self.open, slot),
            Route::Keys(keys) => {
                for (column, kind, key) in keys {
                    let Some(i) = self.columns.iter().position(|c| c.column == *column && c.kind == *kind) else {
                        continue;
                    };
                    let col = &mut self.columns[i];
                    if let Some(list) = col.keys.get_mut(key) {
                        list.remove(&slot);
                        if list.is_empty() {
                            col.keys.remove(key);
                        }
                    }
                    if col.keys.is_empty() {
                        self.columns.swap_remove(i);
                    }
                }
            }
        }
    }

    /// How many times `slot` is filed under `route`'s places.
    fn count(&self, slot: Slot, route: &Route) -> Vec<usize> {
        match route {
            Route::Open => vec![self.open.iter().filter(|&&s| s == slot).count()],
            Route::Keys(keys) => keys
                .iter()
                .map(|(column, kind, key)| {
                    let set = self
                        .columns
                        .iter()
                        .find(|c| c.column == *column && c.kind == *kind)
                        .and_then(|c| c.keys.get(key));
                    usize::from(set.is_some_and(|set| set.contains(&slot)))
                })
                .collect(),
        }
    }
}

/// Where a subscription is filed under one of its tables.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// In `open`.
    Open,
    /// Under each (column, kind, key), each once.
    Keys(Vec<(Box<str>, KeyKind, Box<[u8]>)>),
}

/// Where the bindings naming `schema.table` file a subscription: open if one
/// of them has no index condition, else under every key of every binding.
fn route(bindings: &[Binding], schema: &str, table: &str) -> Route {
    let mut keys: Vec<(Box<str>, KeyKind, Box<[u8]>)> = Vec::new();
    // 100 bindings × 100 values: deduplicated through a set, not a scan.
    let mut seen: HashSet<(Box<str>, KeyKind, Box<[u8]>)> = HashSet::new();
    for b in bindings {
        if b.schema.as_deref() != Some(schema) || b.table.as_deref() != Some(table) {
            continue;
        }
        let Some(index) = b.filter.index_keys() else { return Route::Open };
        for key in index.keys {
            let entry = (index.column.clone(), index.kind, key);
            if !seen.contains(&entry) {
                seen.insert(entry.clone());
                keys.push(entry);
            }
        }
    }
    Route::Keys(keys)
}

fn drop_slot(list: &mut Vec<Slot>, slot: Slot) {
    if let Some(pos) = list.iter().position(|&s| s == slot) {
        list.swap_remove(pos);
    }
}

/// The tables a subscription's bindings name (`None`: a wildcard binding).
fn tables_of(bindings: &[Binding]) -> Option<Vec<(Arc<str>, Arc<str>)>> {
    let mut out: Vec<(Arc<str>, Arc<str>)> = Vec::new();
    for b in bindings {
        match (&b.schema, &b.table) {
            (Some(s), Some(t)) => {
                if !out.iter().any(|(a, b)| **a == **s && **b == **t) {
                    out.push((Arc::from(s.as_str()), Arc::from(t.as_str())));
                }
            }
            _ => return None,
        }
    }
    Some(out)
}

/// A viewer's claim cast to the indexed type: NULL, a value, or a failed cast.
pub type ClaimValue = Result<Option<Scalar>, CastError>;

fn claim_value(viewer: &Viewer, path: &ClaimPath, ty: ColType) -> ClaimValue {
    path.value(&viewer.claims, ty)
}

/// The index key of a claim value (none for NULL or a failed cast).
fn key_of(value: &ClaimValue) -> Option<Scalar> {
    value.as_ref().ok().and_then(|v| v.clone())
}

impl Sub {
    /// The viewer's value of claim `(path, ty)` if the registry resolved it.
    pub fn resolved_claim(
        &self,
        claims: &[(ClaimPath, ColType)],
        path: &ClaimPath,
        ty: ColType,
    ) -> Option<&ClaimValue> {
        claims.iter().position(|(p, t)| *t == ty && p == path).and_then(|i| self.claim_values.get(i))
    }
}

impl Registry {
    /// Live subscriptions.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether none.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The subscription in `slot`.
    pub fn get(&self, slot: Slot) -> Option<&Sub> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    /// Asks the CPU to start loading `slot`'s subscription, without waiting
    /// for it (the fan-out's pipeline: see [`crate::hub`]'s `fan_out`).
    pub fn prefetch(&self, slot: Slot) {
        if slot < self.slots.len() {
            prefetch(self.slots.as_ptr().wrapping_add(slot));
        }
    }

    /// Asks the CPU to start loading what delivering to `slot` touches next:
    /// its bindings and its outbox's queue. Reads the subscription itself,
    /// so call it a few slots after [`Registry::prefetch`].
    pub fn prefetch_parts(&self, slot: Slot) {
        if let Some(sub) = self.get(slot) {
            prefetch(sub.bindings.as_ptr());
            prefetch(Arc::as_ptr(&sub.outbox));
        }
    }

    /// The slot of (conn, topic).
    pub fn find(&self, conn: ConnId, topic: &str) -> Option<Slot> {
        self.by_key.get(&(conn, Arc::from(topic))).copied()
    }

    /// The roles with at least one subscription, and how many each.
    pub fn roles(&self) -> impl Iterator<Item = (&Arc<str>, usize)> {
        self.roles.iter().map(|(r, n)| (r, *n))
    }

    /// Every live subscription.
    pub fn iter(&self) -> impl Iterator<Item = (Slot, &Sub)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
    }

    /// One subscription per connection (they share the connection's outbox).
    pub fn connections(&self) -> impl Iterator<Item = (ConnId, &Sub)> {
        self.by_conn.iter().filter_map(|(&c, l)| l.first().and_then(|&s| self.get(s)).map(|s| (c, s)))
    }

    /// A subscription of `conn`, if any.
    pub fn of_conn(&self, conn: ConnId) -> Option<&Sub> {
        self.by_conn.get(&conn).and_then(|l| l.first()).and_then(|&s| self.get(s))
    }

    /// The slots that may want `change` by their filters (a superset: the
    /// bindings decide): wildcard and open slots, and filtered slots whose
    /// index key is the old or new row's value of the filtered column. Each
    /// slot at most once; returns how many key lookups were made.
    pub fn filtered_candidates(&self, change: &Change, out: &mut Vec<Slot>) -> usize {
        let relation = &change.relation;
        out.extend_from_slice(&self.wildcard);
        let Some(subs) = self.by_table.get(relation.schema.as_str()).and_then(|t| t.get(relation.table.as_str()))
        else {
            return 0;
        };
        out.extend_from_slice(&subs.open);
        let start = out.len();
        let mut lookups = 0;
        let mut hits = 0;
        let mut key = Vec::new();
        for col in &subs.columns {
            let Some(i) = relation.column_index(&col.column) else { continue };
            for row in [change.old_record.as_ref(), change.record.as_ref()].into_iter().flatten() {
                let Some(datum) = row.0.get(i) else { continue };
                if !col.kind.row_key(datum, &mut key) {
                    continue;
                }
                lookups += 1;
                if let Some(set) = col.keys.get(key.as_slice()) {
                    out.extend(set.iter().copied());
                    hits += 1;
                }
            }
        }
        if hits > 1 {
            // The old and new rows, or two columns, may name one slot twice:
            // deduplicate the looked-up part in place.
            out[start..].sort_unstable();
            let mut kept = start;
            for i in start..out.len() {
                if kept == start || out[i] != out[kept - 1] {
                    out[kept] = out[i];
                    kept += 1;
                }
            }
            out.truncate(kept);
        }
        lookups
    }

    /// Slots whose claim `(path, ty)` has key `value`.
    pub fn claim_candidates(&self, path: &ClaimPath, ty: ColType, value: &Scalar, out: &mut Vec<Slot>) {
        if let Some(i) = self.claims.iter().position(|(p, t)| p == path && *t == ty) {
            if let Some(list) = self.by_claim[i].get(value) {
                out.extend_from_slice(list);
            }
        }
    }

    /// The claims viewers are indexed by (registry order).
    pub fn claims(&self) -> &[(ClaimPath, ColType)] {
        &self.claims
    }

    /// Whether the registry indexes claim `(path, ty)`.
    pub fn indexes_claim(&self, path: &ClaimPath, ty: ColType) -> bool {
        self.claims.iter().any(|(p, t)| p == path && *t == ty)
    }

    /// Sets the claims viewers are indexed by (after a policy load), and
    /// re-indexes every subscription.
    pub fn set_claims(&mut self, claims: &[(ClaimPath, ColType)]) {
        self.claims = claims.to_vec();
        self.by_claim = vec![HashMap::new(); claims.len()];
        for slot in 0..self.slots.len() {
            let values = match &self.slots[slot] {
                Some(sub) => self.claims.iter().map(|(p, t)| claim_value(&sub.viewer, p, *t)).collect::<Vec<_>>(),
                None => continue,
            };
            for (i, v) in values.iter().enumerate() {
                if let Some(k) = key_of(v) {
                    self.by_claim[i].entry(k).or_default().push(slot);
                }
            }
            if let Some(sub) = self.slots[slot].as_mut() {
                sub.claim_values = values;
            }
        }
        self.debug_check();
    }

    fn intern(&mut self, topic: &str) -> (Arc<str>, u32) {
        if let Some((t, (id, count))) = self.topics.get_key_value(topic).map(|(t, v)| (Arc::clone(t), *v)) {
            self.topics.insert(Arc::clone(&t), (id, count + 1));
            return (t, id);
        }
        let t: Arc<str> = Arc::from(topic);
        let id = self.next_topic;
        self.next_topic = self.next_topic.wrapping_add(1);
        self.topics.insert(Arc::clone(&t), (id, 1));
        (t, id)
    }

    fn release_topic(&mut self, topic: &Arc<str>) {
        if let Some((_, count)) = self.topics.get_mut(topic) {
            *count -= 1;
            if *count == 0 {
                self.topics.remove(topic);
            }
        }
    }

    /// Adds a subscription, replacing the connection's one on the same
    /// topic (returned).
    pub fn insert(&mut self, sub: Subscription) -> (Slot, Option<Sub>) {
        let replaced = self.remove(sub.conn, &sub.topic);
        let (topic, topic_id) = self.intern(&sub.topic);
        let claim_values: Vec<ClaimValue> = self.claims.iter().map(|(p, t)| claim_value(&sub.viewer, p, *t)).collect();
        let mut viewer = sub.viewer;
        viewer.role = self.intern_role(&viewer.role);
        let entry = Sub {
            conn: sub.conn,
            topic: Arc::clone(&topic),
            topic_id,
            vsn: sub.vsn,
            viewer,
            bindings: sub.bindings,
            outbox: sub.outbox,
            claim_values,
            withheld: sub.on_withheld,
        };
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.by_key.insert((entry.conn, topic), slot);
        self.by_conn.entry(entry.conn).or_default().push(slot);
        self.index(slot, &entry);
        self.slots[slot] = Some(entry);
        self.debug_check();
        (slot, replaced)
    }

    /// The registry's one `Arc` of `role`, so role checks on the fan-out
    /// path compare pointers, not strings in each viewer's allocation.
    fn intern_role(&self, role: &Arc<str>) -> Arc<str> {
        self.roles.get_key_value(role).map_or_else(|| Arc::clone(role), |(r, _)| Arc::clone(r))
    }

    fn index(&mut self, slot: Slot, sub: &Sub) {
        *self.roles.entry(Arc::clone(&sub.viewer.role)).or_default() += 1;
        match tables_of(&sub.bindings) {
            Some(tables) => {
                for (schema, table) in tables {
                    let route = route(&sub.bindings, &schema, &table);
                    if route == Route::Keys(Vec::new()) {
                        // `in.()` only: no change can reach it.
                        continue;
                    }
                    self.by_table.entry(schema).or_default().entry(table).or_default().add(slot, &route);
                }
            }
            None => self.wildcard.push(slot),
        }
        for (i, v) in sub.claim_values.iter().enumerate() {
            if let Some(k) = key_of(v) {
                self.by_claim[i].entry(k).or_default().push(slot);
            }
        }
    }

    fn unindex(&mut self, slot: Slot, sub: &Sub) {
        if let Some(n) = self.roles.get_mut(&sub.viewer.role) {
            *n -= 1;
            if *n == 0 {
                self.roles.remove(&sub.viewer.role);
            }
        }
        match tables_of(&sub.bindings) {
            Some(tables) => {
                for (schema, table) in tables {
                    let route = route(&sub.bindings, &schema, &table);
                    if let Some(of_schema) = self.by_table.get_mut(&schema) {
                        if let Some(subs) = of_schema.get_mut(&table) {
                            subs.drop(slot, &route);
                            if subs.is_empty() {
                                of_schema.remove(&table);
                            }
                        }
                        if of_schema.is_empty() {
                            self.by_table.remove(&schema);
                        }
                    }
                }
            }
            None => drop_slot(&mut self.wildcard, slot),
        }
        for (i, v) in sub.claim_values.iter().enumerate() {
            if let Some(k) = key_of(v) {
                if let Some(list) = self.by_claim[i].get_mut(&k) {
                    drop_slot(list, slot);
                    if list.is_empty() {
                        self.by_claim[i].remove(&k);
                    }
                }
            }
        }
    }

    /// The subscription's "changes withheld" notice and outbox, the first
    /// time only.
    pub fn withheld_notice(&mut self, slot: Slot) -> Option<(Arc<Outbox>, Bytes)> {
        let sub = self.slots.get_mut(slot)?.as_mut()?;
        let notice = sub.withheld.take()?;
        Some((Arc::clone(&sub.outbox), notice))
    }

    /// Changes a subscription's viewer (a new token); returns its outbox.
    pub fn reauth(&mut self, conn: ConnId, topic: &str, viewer: Viewer) -> Option<Arc<Outbox>> {
        let slot = self.find(conn, topic)?;
        let mut sub = self.slots[slot].take()?;
        self.unindex(slot, &sub);
        sub.claim_values = self.claims.iter().map(|(p, t)| claim_value(&viewer, p, *t)).collect();
        let mut viewer = viewer;
        viewer.role = self.intern_role(&viewer.role);
        sub.viewer = viewer;
        self.index(slot, &sub);
        let outbox = Arc::clone(&sub.outbox);
        self.slots[slot] = Some(sub);
        self.debug_check();
        Some(outbox)
    }

    /// Removes (conn, topic), returning it.
    pub fn remove(&mut self, conn: ConnId, topic: &str) -> Option<Sub> {
        let slot = self.by_key.remove(&(conn, Arc::from(topic)))?;
        let sub = self.slots[slot].take()?;
        self.unindex(slot, &sub);
        if let Some(list) = self.by_conn.get_mut(&conn) {
            drop_slot(list, slot);
            if list.is_empty() {
                self.by_conn.remove(&conn);
            }
        }
        self.release_topic(&sub.topic);
        self.free.push(slot);
        self.debug_check();
        Some(sub)
    }

    /// Removes every subscription of `conn`; returns how many.
    pub fn remove_conn(&mut self, conn: ConnId) -> usize {
        let slots = self.by_conn.get(&conn).cloned().unwrap_or_default();
        let mut removed = 0;
        for slot in slots {
            let Some(topic) = self.slots[slot].as_ref().map(|s| Arc::clone(&s.topic)) else { continue };
            if self.remove(conn, &topic).is_some() {
                removed += 1;
            }
        }
        removed
    }

    fn debug_check(&self) {
        // Small registries only (the property tests' sizes): a full check is
        // linear in every subscription's filter keys, run on each change of
        // the registry, and large test registries would pay it squared.
        #[cfg(debug_assertions)]
        if self.by_key.len() > DEBUG_CHECK_MAX_SUBSCRIPTIONS
            || self.by_table.values().flat_map(|t| t.values()).map(TableSubs::len).sum::<usize>()
                > DEBUG_CHECK_MAX_SUBSCRIPTIONS * 16
        {
            return;
        }
        #[cfg(debug_assertions)]
        if let Err(e) = self.check() {
            panic!("registry invariant broken: {e}");
        }
    }

    /// Verifies the invariants of the module doc.
    ///
    /// # Errors
    /// The first one broken.
    pub fn check(&self) -> Result<(), String> {
        let mut free = self.free.clone();
        free.sort_unstable();
        if free.windows(2).any(|w| w[0] == w[1]) {
            return Err("a slot is free twice".into());
        }
        let mut counted = 0;
        for (slot, s) in self.slots.iter().enumerate() {
            let is_free = free.binary_search(&slot).is_ok();
            let Some(sub) = s else {
                if !is_free {
                    return Err(format!("empty slot {slot} not free"));
                }
                continue;
            };
            if is_free {
                return Err(format!("live slot {slot} is free"));
            }
            counted += 1;
            if self.by_key.get(&(sub.conn, Arc::clone(&sub.topic))) != Some(&slot) {
                return Err(format!("slot {slot} missing from by_key"));
            }
            if self.by_conn.get(&sub.conn).map_or(0, |l| l.iter().filter(|&&s| s == slot).count()) != 1 {
                return Err(format!("slot {slot} not once in by_conn"));
            }
            match tables_of(&sub.bindings) {
                Some(tables) => {
                    for (schema, table) in &tables {
                        let route = route(&sub.bindings, schema, table);
                        if route == Route::Keys(Vec::new()) {
                            continue;
                        }
                        let counts = self
                            .by_table
                            .get(schema)
                            .and_then(|t| t.get(table))
                            .map_or_else(|| vec![0], |subs| subs.count(slot, &route));
                        if counts.iter().any(|&n| n != 1) {
                            return Err(format!("slot {slot} not once per key in by_table"));
                        }
                    }
                }
                None => {
                    if self.wildcard.iter().filter(|&&s| s == slot).count() != 1 {
                        return Err(format!("slot {slot} not once in wildcard"));
                    }
                }
            }
            for (i, v) in sub.claim_values.iter().enumerate() {
                if let Some(k) = key_of(v) {
                    if self.by_claim[i].get(&k).map_or(0, |l| l.iter().filter(|&&s| s == slot).count()) != 1 {
                        return Err(format!("slot {slot} not once in by_claim"));
                    }
                }
            }
            if self.topics.get(&sub.topic).map(|t| t.0) != Some(sub.topic_id) {
                return Err(format!("slot {slot}'s topic id is stale"));
            }
        }
        if counted != self.by_key.len() {
            return Err("by_key holds dead entries".into());
        }
        let by_conn: usize = self.by_conn.values().map(Vec::len).sum();
        let by_claim: usize = self.by_claim.iter().flat_map(|m| m.values()).map(Vec::len).sum();
        let expected_claims: usize =
            self.iter().map(|(_, s)| s.claim_values.iter().filter(|v| key_of(v).is_some()).count()).sum();
        let by_table: usize = self.by_table.values().flat_map(|t| t.values()).map(TableSubs::len).sum();
        let expected_tables: usize = self
            .iter()
            .map(|(_, s)| {
                tables_of(&s.bindings).map_or(0, |tables| {
                    tables
                        .iter()
                        .map(|(schema, table)| match route(&s.bindings, schema, table) {
                            Route::Open => 1,
                            Route::Keys(keys) => keys.len(),
                        })
                        .sum()
                })
            })
            .sum();
        let empty = self.by_table.values().any(|t| t.is_empty() || t.values().any(TableSubs::is_empty))
            || self.by_table.values().flat_map(|t| t.values()).any(|t| t.columns.iter().any(|c| c.keys.is_empty()));
        if empty {
            return Err("by_table keeps an empty entry".into());
        }
        if by_conn != counted || by_claim != expected_claims || by_table != expected_tables {
            return Err("an index holds dead entries".into());
        }
        let role_refs: usize = self.roles.values().sum();
        if role_refs != counted || self.roles.values().any(|&n| n == 0) {
            return Err("role counts out of step".into());
        }
        let topic_refs: usize = self.topics.values().map(|t| t.1).sum();
        if topic_refs != counted {
            return Err("topic counts out of step".into());
        }
        Ok(())
    }
}

/// A hint to load the cache line at `ptr` (no-op off x86-64). Never
/// dereferences: any address is fine.
#[inline(always)]
fn prefetch<T>(ptr: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint; it does not fault or read into any
    // register, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ptr.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{EventMatch, OutboxLimits};
    use crate::policy::Filter;
    use proptest::prelude::*;

    /// Filters of the bindings: none, indexed (one or several keys, keys
    /// shared between subscriptions), unindexed, and `in.()`.
    const SPECS: [&str; 6] = ["", "c=eq.1", "c=in.(1,2)", "c=neq.1", "c=in.()", "d=eq.x,c=in.(2,3)"];

    fn sub(conn: ConnId, topic: u8, user: u8, table: Option<u8>) -> Subscription {
        // The filter follows from (topic, user), so a rejoin may change it.
        let spec = if table.is_some() { SPECS[(usize::from(topic) + usize::from(user)) % SPECS.len()] } else { "" };
        let user = uuid::Uuid::from_u128(u128::from(user));
        let filter = Filter::parse(spec, |_| Some("text")).unwrap();
        Subscription {
            conn,
            topic: format!("realtime:t{topic}"),
            vsn: Vsn::V1,
            viewer: Viewer::user(user),
            bindings: vec![Binding {
                id: 1,
                schema: Some("public".into()),
                table: table.map(|t| format!("t{t}")),
                event: EventMatch::All,
                filter,
                select: None,
            }],
            outbox: Arc::new(Outbox::new(OutboxLimits::default())),
            on_live: None,
            on_withheld: None,
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Join(u8, u8, u8, Option<u8>),
        Leave(u8, u8),
        Reauth(u8, u8, u8),
        Disconnect(u8),
        Claims(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6, 0u8..4, 0u8..5, proptest::option::of(0u8..3)).prop_map(|(c, t, u, tb)| Op::Join(c, t, u, tb)),
            (0u8..6, 0u8..4).prop_map(|(c, t)| Op::Leave(c, t)),
            (0u8..6, 0u8..4, 0u8..5).prop_map(|(c, t, u)| Op::Reauth(c, t, u)),
            (0u8..6).prop_map(Op::Disconnect),
            any::<bool>().prop_map(Op::Claims),
        ]
    }

    #[test]
    fn prefetching_any_slot_is_harmless_and_changes_nothing() {
        let mut r = Registry::default();
        let (slot, _) = r.insert(sub(1, 1, 1, Some(1)));
        let (gone, _) = r.insert(sub(2, 2, 2, Some(1)));
        assert!(r.remove(2, "realtime:t2").is_some());
        for s in [slot, gone, gone + 1, usize::MAX] {
            r.prefetch(s);
            r.prefetch_parts(s);
        }
        assert_eq!(r.get(slot).map(|s| s.conn), Some(1));
        assert!(r.get(gone).is_none());
    }

    proptest! {
        #[test]
        fn invariants_hold_under_any_sequence(ops in proptest::collection::vec(op(), 1..80)) {
            let mut r = Registry::default();
            let mut model: HashMap<(ConnId, String), u8> = HashMap::new();
            for o in ops {
                match o {
                    Op::Join(c, t, u, tb) => {
                        r.insert(sub(c.into(), t, u, tb));
                        model.insert((c.into(), format!("realtime:t{t}")), u);
                    }
                    Op::Leave(c, t) => {
                        r.remove(c.into(), &format!("realtime:t{t}"));
                        model.remove(&(c.into(), format!("realtime:t{t}")));
                    }
                    Op::Reauth(c, t, u) => {
                        let topic = format!("realtime:t{t}");
                        let v = Viewer::user(uuid::Uuid::from_u128(u128::from(u)));
                        if r.reauth(c.into(), &topic, v).is_some() {
                            model.insert((c.into(), topic), u);
                        }
                    }
                    Op::Disconnect(c) => {
                        r.remove_conn(c.into());
                        model.retain(|(conn, _), _| *conn != ConnId::from(c));
                    }
                    Op::Claims(on) => {
                        let claims = if on { vec![(ClaimPath::sub(), ColType::Uuid)] } else { vec![] };
                        r.set_claims(&claims);
                    }
                }
                prop_assert_eq!(r.check(), Ok(()));
                prop_assert_eq!(r.len(), model.len());
            }
            // Every claim lookup finds exactly the model's subscriptions.
            r.set_claims(&[(ClaimPath::sub(), ColType::Uuid)]);
            for u in 0u8..5 {
                let key = Scalar::Uuid(uuid::Uuid::from_u128(u128::from(u)));
                let mut found = Vec::new();
                r.claim_candidates(&ClaimPath::sub(), ColType::Uuid, &key, &mut found);
                prop_assert_eq!(found.len(), model.values().filter(|&&v| v == u).count());
            }
        }
    }
}
