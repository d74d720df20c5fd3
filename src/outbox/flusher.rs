//! Flushers: the tasks that put the hub's frames on the sockets once a
//! batch is queued, so the writes of a large fan-out run on every worker
//! thread while the hub goes on with the next batch.
//!
//! ```text
//!  hub ──Vec<Arc<Outbox>> (a share of the batch's outboxes; bounded, try_send)──▶ flusher k ──writev──▶ sockets
//!   └─ a small batch, or a flusher whose queue is full: written by the hub itself
//! ```
//!
//! Invariants: nothing here waits on a client (every write is
//! [`Outbox::flush`], non-blocking); the hub never waits on a flusher (a
//! full queue means the hub writes that share itself); an outbox may be
//! flushed by two tasks at once, which is safe because every write is made
//! under the outbox's lock from the front of its queue.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::Outbox;

/// Up to this many outboxes are flushed by the hub itself: fewer writes
/// than a hand-off's wake-up is worth.
pub const INLINE_MAX: usize = 64;

/// Shares queued per flusher before the hub writes for itself.
const QUEUE: usize = 4;

/// The flusher tasks.
#[derive(Debug)]
pub struct Flushers {
    /// One queue per flusher; a flusher ends once its queue is dropped
    /// (after writing what it holds).
    queues: Vec<mpsc::Sender<Vec<Arc<Outbox>>>>,
    next: usize,
}

impl Flushers {
    /// Starts `n` flushers on the current runtime (0: the hub writes
    /// everything itself).
    pub fn start(n: usize) -> Flushers {
        let mut queues = Vec::with_capacity(n);
        for k in 0..n {
            let (tx, mut rx) = mpsc::channel::<Vec<Arc<Outbox>>>(QUEUE);
            queues.push(tx);
            tokio::spawn(tracing::Instrument::instrument(
                async move {
                    while let Some(share) = rx.recv().await {
                        for outbox in share {
                            outbox.flush();
                        }
                    }
                },
                tracing::debug_span!("flusher", k),
            ));
        }
        Flushers { queues, next: 0 }
    }

    /// No flushers: everything is written by the caller.
    pub fn inline() -> Flushers {
        Flushers { queues: Vec::new(), next: 0 }
    }

    /// Writes `list`'s outboxes (and empties it): a short list at once, a
    /// long one shared out between the flushers.
    pub fn flush(&mut self, list: &mut Vec<Arc<Outbox>>) {
        if list.len() <= INLINE_MAX || self.queues.is_empty() {
            for outbox in list.drain(..) {
                outbox.flush();
            }
            return;
        }
        let n = self.queues.len();
        let share = list.len().div_ceil(n);
        while !list.is_empty() {
            let part: Vec<Arc<Outbox>> = list.drain(list.len().saturating_sub(share)..).collect();
            let queue = &self.queues[self.next % n];
            self.next = self.next.wrapping_add(1);
            if let Err(err) = queue.try_send(part) {
                let (mpsc::error::TrySendError::Full(part) | mpsc::error::TrySendError::Closed(part)) = err;
                for outbox in part {
                    outbox.flush();
                }
            }
        }
    }
}
