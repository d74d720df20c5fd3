//! Sockets counted per key against a limit: the budgets of
//! `--max-sockets-per-user` (shared by the HTTP front, for the upgrade's
//! apikey, and the sessions, for each channel's token) and of
//! `--max-sockets-per-address` (the front).
//!
//! supabase-js connects with the project's anon key and sends the user's
//! token in each join (`access_token`), so counting only the upgrade's token
//! would never count a supabase-js user: a socket counts once for every
//! user (`sub`) whose token it presented, at the upgrade or in a join or an
//! `access_token` message, until it closes.
//!
//! Invariants: a count is taken and checked under one lock (a burst cannot
//! overshoot); a [`CountSlot`] gives back exactly its one count when
//! dropped; keys with no socket are not in the map.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// Sockets per key, each checked against the limit when taken. Clones share
/// the counts.
#[derive(Debug, Clone)]
pub struct KeyedCounts<K> {
    limit: usize,
    map: Arc<Mutex<HashMap<K, usize>>>,
}

/// One socket counted for one key; gives the count back when dropped.
#[derive(Debug)]
pub struct CountSlot<K: Hash + Eq> {
    key: K,
    map: Arc<Mutex<HashMap<K, usize>>>,
}

/// Sockets per user (`sub`).
pub type UserSockets = KeyedCounts<String>;

/// One socket counted for one user.
pub type UserSlot = CountSlot<String>;

impl<K: Hash + Eq + Clone> KeyedCounts<K> {
    /// At most `limit` sockets per key.
    pub fn new(limit: usize) -> KeyedCounts<K> {
        KeyedCounts { limit, map: Arc::default() }
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Counts one more socket for `key`, unless it holds the limit already.
    pub fn take(&self, key: K) -> Option<CountSlot<K>> {
        let mut map = self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = map.get(&key).copied().unwrap_or(0);
        if count >= self.limit {
            return None;
        }
        map.insert(key.clone(), count + 1);
        Some(CountSlot { key, map: Arc::clone(&self.map) })
    }

    /// Sockets counted for `key` now.
    pub fn count(&self, key: &K) -> usize {
        self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(key).copied().unwrap_or(0)
    }
}

impl<K: Hash + Eq> CountSlot<K> {
    /// The key.
    pub fn key(&self) -> &K {
        &self.key
    }
}

impl<K: Hash + Eq> Drop for CountSlot<K> {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = map.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_bounded_and_given_back() {
        let users = UserSockets::new(2);
        let a = users.take("u".into()).unwrap();
        let b = users.take("u".into()).unwrap();
        assert!(users.take("u".into()).is_none(), "the third is refused");
        assert!(users.take("v".into()).is_some(), "another user is not affected");
        drop(a);
        assert_eq!(users.count(&"u".into()), 1);
        let c = users.take("u".into()).expect("a freed count is reusable");
        drop((b, c));
        assert_eq!(users.count(&"u".into()), 0);
        assert!(users.map.lock().unwrap().is_empty(), "no entry for users without sockets");
    }
}
