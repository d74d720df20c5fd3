//! Presence state of one room: who tracks what, as `presence_state` and
//! `presence_diff` payloads (broadcast-presence.md §3).
//!
//! Each joined channel tracks at most one entry, under its key (from
//! `config.presence.key`, else a fresh UUID per join); several channels may
//! share a key (one meta each). A meta on the wire is the tracked payload
//! plus `phx_ref` (and `phx_ref_prev` after an update); internally each
//! entry also carries the node that holds its channel, so a cluster can
//! drop a dead node's entries.
//!
//! Invariants: `phx_ref`s are unique per node (node id + counter), never
//! reused for another meta (realtime-js deduplicates by them); an update is
//! one diff holding the new meta in `joins` and the old in `leaves`, both
//! maps always present.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use serde_json::{Map, Value};

use crate::hub::ConnId;

/// A node of a cluster (a random id per process).
pub type NodeId = u32;

/// Mints `phx_ref`s: url-safe base64 of 12 bytes (node id, counter), as
/// Supabase's are 12 opaque bytes.
#[derive(Debug)]
pub struct Refs {
    node: NodeId,
    next: AtomicU64,
}

impl Refs {
    /// Refs of `node`.
    pub fn new(node: NodeId) -> Refs {
        Refs { node, next: AtomicU64::new(1) }
    }

    /// The node whose refs these are.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// A fresh ref.
    pub fn mint(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut bytes = [0u8; 12];
        bytes[..4].copy_from_slice(&self.node.to_be_bytes());
        bytes[4..].copy_from_slice(&n.to_be_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }
}

/// One tracked entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The presence key.
    pub key: String,
    /// Its `phx_ref`.
    pub phx_ref: String,
    /// What was tracked.
    pub payload: Map<String, Value>,
    /// The node holding the channel.
    pub node: NodeId,
}

impl Entry {
    /// The meta on the wire: the payload, `phx_ref`, and `phx_ref_prev`.
    fn meta(&self, prev: Option<&str>) -> Value {
        let mut meta = self.payload.clone();
        meta.insert("phx_ref".into(), Value::String(self.phx_ref.clone()));
        if let Some(prev) = prev {
            meta.insert("phx_ref_prev".into(), Value::String(prev.to_owned()));
        }
        Value::Object(meta)
    }
}

/// A `presence_diff` payload under construction.
#[derive(Debug, Default)]
pub struct Diff {
    joins: BTreeMap<String, Vec<Value>>,
    leaves: BTreeMap<String, Vec<Value>>,
}

impl Diff {
    /// Nothing joined or left.
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty()
    }

    /// `{"joins": {key: {"metas": […]}}, "leaves": {…}}`.
    pub fn payload(&self) -> Value {
        let side = |side: &BTreeMap<String, Vec<Value>>| {
            Value::Object(side.iter().map(|(k, metas)| (k.clone(), serde_json::json!({ "metas": metas }))).collect())
        };
        serde_json::json!({ "joins": side(&self.joins), "leaves": side(&self.leaves) })
    }
}

/// What a `track` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracked {
    /// A new entry.
    Joined,
    /// The channel's entry got a new payload.
    Updated,
    /// The same payload as the last track: nothing changed.
    Unchanged,
}

/// Who holds an entry: a channel (by its socket) on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Holder {
    /// The node serving the socket.
    pub node: NodeId,
    /// The socket on that node.
    pub conn: ConnId,
}

/// The presence of one room.
#[derive(Debug, Default)]
pub struct Presence {
    entries: HashMap<Holder, Entry>,
}

impl Presence {
    /// Entries tracked.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nobody tracks.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `holder`'s channel tracks `payload` under `key` with a fresh
    /// `phx_ref`; the diff to send.
    pub fn track(
        &mut self,
        holder: Holder,
        key: &str,
        payload: Map<String, Value>,
        phx_ref: String,
    ) -> (Tracked, Diff) {
        let mut diff = Diff::default();
        let fresh = Entry { key: key.to_owned(), phx_ref, payload, node: holder.node };
        match self.entries.get(&holder) {
            Some(old) if old.payload == fresh.payload && old.key == fresh.key => (Tracked::Unchanged, diff),
            Some(old) => {
                diff.leaves.entry(old.key.clone()).or_default().push(old.meta(None));
                diff.joins.entry(fresh.key.clone()).or_default().push(fresh.meta(Some(&old.phx_ref)));
                self.entries.insert(holder, fresh);
                (Tracked::Updated, diff)
            }
            None => {
                diff.joins.entry(fresh.key.clone()).or_default().push(fresh.meta(None));
                self.entries.insert(holder, fresh);
                (Tracked::Joined, diff)
            }
        }
    }

    /// `holder`'s channel stops tracking; the diff (empty if it tracked nothing).
    pub fn untrack(&mut self, holder: Holder) -> Diff {
        let mut diff = Diff::default();
        if let Some(old) = self.entries.remove(&holder) {
            diff.leaves.entry(old.key.clone()).or_default().push(old.meta(None));
        }
        diff
    }

    /// Every entry of `node` leaves (a node gone); the diff.
    pub fn drop_node(&mut self, node: NodeId) -> Diff {
        let mut diff = Diff::default();
        self.entries.retain(|holder, entry| {
            if holder.node == node {
                diff.leaves.entry(entry.key.clone()).or_default().push(entry.meta(None));
                false
            } else {
                true
            }
        });
        diff
    }

    /// The entries `node` holds.
    pub fn held_by(&self, node: NodeId) -> impl Iterator<Item = (&Holder, &Entry)> {
        self.entries.iter().filter(move |(holder, _)| holder.node == node)
    }

    /// `holder`'s entry.
    pub fn get(&self, holder: Holder) -> Option<&Entry> {
        self.entries.get(&holder)
    }

    /// The `presence_state` payload: `{key: {"metas": […]}}`.
    pub fn state(&self) -> Value {
        let mut keys: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
        for entry in self.entries.values() {
            keys.entry(&entry.key).or_default().push(entry);
        }
        Value::Object(
            keys.into_iter()
                .map(|(key, mut entries)| {
                    // Oldest first (refs count up), so the state reads stably.
                    entries.sort_by(|a, b| a.phx_ref.cmp(&b.phx_ref));
                    let metas: Vec<Value> = entries.iter().map(|e| e.meta(None)).collect();
                    (key.to_owned(), serde_json::json!({ "metas": metas }))
                })
                .collect(),
        )
    }
}

/// A presence key from `config.presence.key`: a non-empty string as is,
/// another scalar as its JSON text; `None` for missing, null or `""` (the
/// channel then gets a fresh UUID).
pub fn key_from_config(value: Option<&Value>) -> Option<String> {
    match value {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn h(conn: ConnId) -> Holder {
        Holder { node: 7, conn }
    }

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn track_update_untrack() {
        let refs = Refs::new(7);
        let mut p = Presence::default();
        let (t, d) = p.track(h(1), "u1", map(json!({"user": "u1"})), refs.mint());
        assert_eq!(t, Tracked::Joined);
        let joined = d.payload();
        let r1 = joined["joins"]["u1"]["metas"][0]["phx_ref"].as_str().unwrap().to_owned();
        assert_eq!(joined["leaves"], json!({}));
        assert_eq!(joined["joins"]["u1"]["metas"][0]["user"], "u1");
        assert_eq!(p.track(h(1), "u1", map(json!({"user": "u1"})), refs.mint()).0, Tracked::Unchanged);
        // A second channel with the same key: two metas under one key.
        p.track(h(2), "u1", map(json!({"user": "u1", "tab": 2})), refs.mint());
        assert_eq!(p.state()["u1"]["metas"].as_array().unwrap().len(), 2);
        let (t, d) = p.track(h(1), "u1", map(json!({"user": "u1", "status": "away"})), refs.mint());
        assert_eq!(t, Tracked::Updated);
        let d = d.payload();
        assert_eq!(d["joins"]["u1"]["metas"][0]["phx_ref_prev"], r1.as_str());
        assert_eq!(d["leaves"]["u1"]["metas"][0]["phx_ref"], r1.as_str());
        assert_ne!(d["joins"]["u1"]["metas"][0]["phx_ref"], r1.as_str());
        let d = p.untrack(h(2)).payload();
        assert_eq!(d["leaves"]["u1"]["metas"][0]["tab"], 2);
        assert!(p.untrack(h(2)).is_empty(), "untracked twice: no diff");
        assert_eq!(p.len(), 1);
        let state = p.state();
        assert_eq!(state["u1"]["metas"][0]["status"], "away");
        assert!(state["u1"]["metas"][0].get("phx_ref_prev").is_none(), "state metas carry no phx_ref_prev");
    }

    #[test]
    fn refs_are_unique_and_url_safe() {
        let refs = Refs::new(u32::MAX);
        let a = refs.mint();
        let b = refs.mint();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }

    #[test]
    fn keys_from_config() {
        assert_eq!(key_from_config(None), None);
        assert_eq!(key_from_config(Some(&json!(""))), None);
        assert_eq!(key_from_config(Some(&json!(null))), None);
        assert_eq!(key_from_config(Some(&json!("u1"))).as_deref(), Some("u1"));
        assert_eq!(key_from_config(Some(&json!(42))).as_deref(), Some("42"));
    }
}
