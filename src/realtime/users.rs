//! Sockets per user: the budget of `--max-sockets-per-user`, shared by the
//! HTTP front (the upgrade's apikey) and the sessions (each channel's token).
//!
//! supabase-js connects with the project's anon key and sends the user's
//! token in each join (`access_token`), so counting only the upgrade's token
//! would never count a supabase-js user: a socket counts once for every
//! user (`sub`) whose token it presented, at the upgrade or in a join or an
//! `access_token` message, until it closes.
//!
//! Invariants: a count is taken and checked under one lock (a burst cannot
//! overshoot); a [`UserSlot`] gives back exactly its one count when dropped;
//! users with no socket are not in the map.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Sockets per `sub`, each checked against the limit when taken. Clones
/// share the counts.
#[derive(Debug, Clone)]
pub struct UserSockets {
    limit: usize,
    map: Arc<Mutex<HashMap<String, usize>>>,
}

/// One socket counted for one user; gives the count back when dropped.
#[derive(Debug)]
pub struct UserSlot {
    sub: String,
    map: Arc<Mutex<HashMap<String, usize>>>,
}

impl UserSockets {
    /// At most `limit` sockets per user.
    pub fn new(limit: usize) -> UserSockets {
        UserSockets { limit, map: Arc::default() }
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Counts one more socket for `sub`, unless it holds the limit already.
    pub fn take(&self, sub: &str) -> Option<UserSlot> {
        let mut map = self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = map.get(sub).copied().unwrap_or(0);
        if count >= self.limit {
            return None;
        }
        map.insert(sub.to_owned(), count + 1);
        Some(UserSlot { sub: sub.to_owned(), map: Arc::clone(&self.map) })
    }

    /// Sockets counted for `sub` now.
    pub fn count(&self, sub: &str) -> usize {
        self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(sub).copied().unwrap_or(0)
    }
}

impl UserSlot {
    /// The user.
    pub fn sub(&self) -> &str {
        &self.sub
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = map.get_mut(&self.sub) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.sub);
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
        let a = users.take("u").unwrap();
        let b = users.take("u").unwrap();
        assert!(users.take("u").is_none(), "the third is refused");
        assert!(users.take("v").is_some(), "another user is not affected");
        drop(a);
        assert_eq!(users.count("u"), 1);
        let c = users.take("u").expect("a freed count is reusable");
        drop((b, c));
        assert_eq!(users.count("u"), 0);
        assert!(users.map.lock().unwrap().is_empty(), "no entry for users without sockets");
    }
}
