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

use super::{Outbox, Releases};

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
    /// Shares handed to a flusher so far.
    handed: u64,
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
                        let mut releases = Releases::default();
                        for outbox in share {
                            outbox.flush_into(&mut releases);
                        }
                    }
                },
                tracing::debug_span!("flusher", k),
            ));
        }
        Flushers { queues, next: 0, handed: 0 }
    }

    /// No flushers: everything is written by the caller.
    pub fn inline() -> Flushers {
        Flushers { queues: Vec::new(), next: 0, handed: 0 }
    }

    /// Writes `list`'s outboxes (and empties it): a short list at once, a
    /// long one shared out between the flushers.
    pub fn flush(&mut self, list: &mut Vec<Arc<Outbox>>) {
        let mut releases = Releases::default();
        if list.len() <= INLINE_MAX || self.queues.is_empty() {
            for outbox in list.drain(..) {
                outbox.flush_into(&mut releases);
            }
            return;
        }
        let n = self.queues.len();
        let share = list.len().div_ceil(n);
        while !list.is_empty() {
            let part: Vec<Arc<Outbox>> = list.drain(list.len().saturating_sub(share)..).collect();
            let queue = &self.queues[self.next % n];
            self.next = self.next.wrapping_add(1);
            match queue.try_send(part) {
                Ok(()) => self.handed += 1,
                Err(mpsc::error::TrySendError::Full(part) | mpsc::error::TrySendError::Closed(part)) => {
                    for outbox in part {
                        outbox.flush_into(&mut releases);
                    }
                }
            }
        }
    }

    /// Shares handed to a flusher so far.
    pub fn handed(&self) -> u64 {
        self.handed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{now_ms, OutboxBudget, OutboxLimits};
    use bytes::Bytes;
    use tokio::io::AsyncReadExt;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_batch_is_shared_out_and_every_socket_gets_its_frames_in_order() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let budget = OutboxBudget::new(1 << 30);
        let mut outboxes = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..(INLINE_MAX * 3) {
            let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let (_read, write) = server.into_split();
            outboxes.push(Arc::new(Outbox::with_socket(OutboxLimits::default(), Arc::clone(&budget), write)));
            clients.push(client);
        }
        let mut flushers = Flushers::start(2);
        let frames: Vec<Bytes> = (0..20u32).map(|i| Bytes::from(format!("[{i}]"))).collect();
        for frame in &frames {
            let mut list = Vec::new();
            for outbox in &outboxes {
                if outbox.push_deferred(frame.clone(), now_ms()).unwrap() {
                    list.push(Arc::clone(outbox));
                }
            }
            // An outbox a flusher has not reached yet is still listed: its
            // share writes the new frame too.
            assert!(list.len() <= outboxes.len());
            flushers.flush(&mut list);
            assert!(list.is_empty());
        }
        assert!(flushers.handed() > 0, "a batch over {INLINE_MAX} sockets went to the flushers");
        for client in &mut clients {
            for frame in &frames {
                let mut head = [0u8; 2];
                client.read_exact(&mut head).await.unwrap();
                assert_eq!(head, [0x81, frame.len() as u8]);
                let mut payload = vec![0u8; frame.len()];
                client.read_exact(&mut payload).await.unwrap();
                assert_eq!(payload, frame.to_vec(), "whole frames, in the order queued");
            }
        }
        // A flusher returns its share's bytes once, after its last write.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while budget.used() != 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn a_pass_returns_the_bytes_it_wrote_to_the_budget_once_at_its_end() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let budget = OutboxBudget::new(1 << 20);
        let mut pairs = Vec::new();
        for _ in 0..3 {
            let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let (_read, write) = server.into_split();
            let outbox = Arc::new(Outbox::with_socket(OutboxLimits::default(), Arc::clone(&budget), write));
            outbox.push_deferred(Bytes::from_static(b"[1]"), now_ms()).unwrap();
            pairs.push((outbox, client));
        }
        let charged = budget.used();
        assert!(charged > 0);
        let mut releases = Releases::default();
        for (outbox, _) in &pairs {
            outbox.flush_into(&mut releases);
        }
        assert_eq!(budget.used(), charged, "written, still counted until the pass ends");
        drop(releases);
        assert_eq!(budget.used(), 0);
        for (_, client) in &mut pairs {
            let mut frame = [0u8; 5];
            client.read_exact(&mut frame).await.unwrap();
            assert_eq!(&frame, b"\x81\x03[1]");
        }
    }
}
