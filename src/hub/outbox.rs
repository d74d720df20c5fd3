//! The per-connection outbox: a bounded queue of serialized frames between
//! the hub (and the connection's own replies) and the WebSocket writer.
//!
//! Pushing never waits: when a push would exceed the message or byte limit,
//! the push fails and the outbox is closed with a reason, so the hub can drop
//! that subscriber and go on — the replication path never waits on a client
//! and memory per connection stays bounded. The writer drains everything
//! queued at once (one batch, one flush).
//!
//! An empty outbox holds no heap memory (an idle connection costs only the
//! struct).

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

/// Limits of one outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Most frames queued.
    pub max_messages: usize,
    /// Most bytes queued.
    pub max_bytes: usize,
}

impl Default for OutboxLimits {
    /// 1,024 frames or 4 MiB.
    fn default() -> Self {
        OutboxLimits { max_messages: 1024, max_bytes: 4 << 20 }
    }
}

/// Why an outbox was closed; becomes the WebSocket close frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// WebSocket close code.
    pub code: u16,
    /// Human-readable reason (≤ 123 bytes to fit a close frame).
    pub reason: String,
}

impl CloseReason {
    /// 1013 "try again later": the client did not read fast enough.
    pub fn slow_consumer(limits: OutboxLimits) -> CloseReason {
        CloseReason {
            code: 1013,
            reason: format!(
                "slow consumer: more than {} messages or {} bytes queued",
                limits.max_messages, limits.max_bytes
            ),
        }
    }

    /// 1001 "going away": the server is shutting down.
    pub fn shutdown() -> CloseReason {
        CloseReason { code: 1001, reason: "server shutting down".into() }
    }
}

/// A push that did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The limits were reached; the outbox is now closed.
    #[error("outbox full; closed as a slow consumer")]
    Full,
    /// The outbox was already closed.
    #[error("outbox closed")]
    Closed,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Bytes>,
    bytes: usize,
    closed: Option<CloseReason>,
}

/// The queue. Share it behind an `Arc`.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    limits: OutboxLimits,
}

impl Outbox {
    /// An empty outbox.
    pub fn new(limits: OutboxLimits) -> Outbox {
        Outbox { state: Mutex::new(State::default()), notify: Notify::new(), limits }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `frame` without waiting.
    ///
    /// # Errors
    /// [`PushError::Full`] (and the outbox closes as a slow consumer) or
    /// [`PushError::Closed`].
    pub fn push(&self, frame: Bytes) -> Result<(), PushError> {
        let mut state = self.lock();
        if state.closed.is_some() {
            return Err(PushError::Closed);
        }
        if state.queue.len() >= self.limits.max_messages || state.bytes + frame.len() > self.limits.max_bytes {
            state.closed = Some(CloseReason::slow_consumer(self.limits));
            state.queue.clear();
            state.queue.shrink_to_fit();
            state.bytes = 0;
            drop(state);
            self.notify.notify_one();
            return Err(PushError::Full);
        }
        state.bytes += frame.len();
        state.queue.push_back(frame);
        let first = state.queue.len() == 1;
        drop(state);
        if first {
            self.notify.notify_one();
        }
        Ok(())
    }

    /// Closes the outbox: queued frames are still handed out, then `reason`.
    /// The first reason wins.
    pub fn close(&self, reason: CloseReason) {
        let mut state = self.lock();
        if state.closed.is_none() {
            state.closed = Some(reason);
        }
        drop(state);
        self.notify.notify_one();
    }

    /// Whether the outbox is closed.
    pub fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }

    /// Frames and bytes queued.
    pub fn depth(&self) -> (usize, usize) {
        let state = self.lock();
        (state.queue.len(), state.bytes)
    }

    /// Moves every queued frame into `out` without waiting; returns how many.
    pub fn try_drain(&self, out: &mut Vec<Bytes>) -> usize {
        let mut state = self.lock();
        let n = state.queue.len();
        out.extend(state.queue.drain(..));
        state.bytes = 0;
        n
    }

    /// Moves every queued frame into `out`, waiting for at least one.
    ///
    /// # Errors
    /// The close reason once the outbox is closed and (unless it closed as a
    /// slow consumer, which discards the queue) drained.
    pub async fn next_batch(&self, out: &mut Vec<Bytes>) -> Result<(), CloseReason> {
        loop {
            {
                let mut state = self.lock();
                if !state.queue.is_empty() {
                    out.extend(state.queue.drain(..));
                    state.bytes = 0;
                    if state.queue.capacity() > 64 {
                        state.queue.shrink_to_fit();
                    }
                    return Ok(());
                }
                if let Some(reason) = &state.closed {
                    return Err(reason.clone());
                }
            }
            self.notify.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_by_messages_and_bytes_and_closed_when_full() {
        let outbox = Outbox::new(OutboxLimits { max_messages: 3, max_bytes: 10 });
        outbox.push(Bytes::from_static(b"abcd")).unwrap();
        outbox.push(Bytes::from_static(b"efgh")).unwrap();
        assert_eq!(outbox.depth(), (2, 8));
        assert_eq!(outbox.push(Bytes::from_static(b"ijk")), Err(PushError::Full));
        assert_eq!(outbox.push(Bytes::from_static(b"x")), Err(PushError::Closed));
        let mut out = Vec::new();
        let err = outbox.next_batch(&mut out).await.unwrap_err();
        assert_eq!(err.code, 1013);
        assert!(out.is_empty(), "a slow consumer's queue is discarded");

        let outbox = Outbox::new(OutboxLimits { max_messages: 2, max_bytes: 100 });
        outbox.push(Bytes::from_static(b"1")).unwrap();
        outbox.push(Bytes::from_static(b"2")).unwrap();
        assert_eq!(outbox.push(Bytes::from_static(b"3")), Err(PushError::Full));
    }

    #[tokio::test]
    async fn drains_in_order_then_reports_the_close() {
        let outbox = std::sync::Arc::new(Outbox::new(OutboxLimits::default()));
        let writer = {
            let outbox = std::sync::Arc::clone(&outbox);
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut batch = Vec::new();
                loop {
                    match outbox.next_batch(&mut batch).await {
                        Ok(()) => got.append(&mut batch),
                        Err(reason) => return (got, reason),
                    }
                }
            })
        };
        for i in 0..100u8 {
            outbox.push(Bytes::from(vec![i])).unwrap();
            if i % 10 == 0 {
                tokio::task::yield_now().await;
            }
        }
        outbox.close(CloseReason::shutdown());
        let (got, reason) = writer.await.unwrap();
        assert_eq!(got.iter().map(|b| b[0]).collect::<Vec<_>>(), (0..100).collect::<Vec<_>>());
        assert_eq!(reason.code, 1001);
    }
}
