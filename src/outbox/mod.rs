//! The per-connection outbox: the queue of serialized frames between the
//! hub (and the connection's own replies) and the WebSocket, the writes to
//! the socket, and the global [`OutboxBudget`] every outbox charges.
//!
//! ```text
//!  hub ──push_deferred(frame, at)…──▶ Outbox ──flush() (the hub, once per batch: one
//!                                      │        non-blocking writev per socket)──▶ socket
//!  session ──push_reply──▶             │ ──notify──▶ writer task: write_now(), and on a full
//!  tungstenite (pong, close) ──push_raw─┘               socket waits until it is writable
//! ```
//!
//! It sits below the hub and the realtime sessions (both use it) and knows
//! only WebSocket framing ([`socket`]): a frame is queued as its payload and
//! its header is made when it is written, so one payload is shared by every
//! receiver and never copied per receiver.
//!
//! Invariants:
//! - pushing never waits. Hub frames are always taken: the hub itself keeps
//!   the total within the [`OutboxBudget`] (it pauses, see
//!   [`crate::hub`]); a connection's own replies are capped per socket
//!   ([`OutboxLimits::max_reply_bytes`]) so a client that sends requests
//!   without reading is closed, not the server;
//! - with a socket, every write is a non-blocking `writev` made under the
//!   outbox's lock from the front of the queue, whoever makes it (the hub's
//!   flush or the writer task): frames go out whole and in queue order, and
//!   nobody ever waits on a client while holding the lock;
//! - bytes stay charged until they are on the socket (without a socket:
//!   until the writer reports [`Outbox::written`]); a dropped or
//!   [`close_now`](Outbox::close_now)d outbox releases all (but a frame
//!   already partly on the socket is finished before the close frame);
//! - [`Outbox::lag`] is the age of the oldest frame not yet written: the
//!   hub closes a reader whose lag passes its limit;
//! - an empty outbox holds no heap memory (an idle connection costs only
//!   the struct).

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

pub mod flusher;
pub mod socket;

/// Bytes charged per queued frame on top of its length (the queue entry).
const ENTRY_OVERHEAD: usize = std::mem::size_of::<Entry>();

/// Milliseconds since the first call in this process: the outboxes' clock.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Limits of one outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Most bytes of the connection's own replies (heartbeats, join and
    /// error replies) queued before it is closed as a slow consumer.
    pub max_reply_bytes: usize,
}

impl Default for OutboxLimits {
    /// 1 MiB of replies.
    fn default() -> Self {
        OutboxLimits { max_reply_bytes: 1 << 20 }
    }
}

/// The memory every outbox together may hold, in bytes (queued and being
/// written). The hub checks it before fanning out and pauses when it is
/// used up.
#[derive(Debug)]
pub struct OutboxBudget {
    used: AtomicUsize,
    limit: usize,
    waiting: AtomicBool,
    room: Notify,
    peak: AtomicUsize,
}

/// Default global outbox budget: 512 MiB.
pub const DEFAULT_OUTBOX_BUDGET: usize = 512 << 20;

impl OutboxBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<OutboxBudget> {
        Arc::new(OutboxBudget {
            used: AtomicUsize::new(0),
            limit,
            waiting: AtomicBool::new(false),
            room: Notify::new(),
            peak: AtomicUsize::new(0),
        })
    }

    /// A budget that is never used up (tools and tests).
    pub fn unlimited() -> Arc<OutboxBudget> {
        OutboxBudget::new(usize::MAX / 2)
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The most bytes ever held.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether the budget is used up.
    pub fn exhausted(&self) -> bool {
        self.used() >= self.limit
    }

    fn charge(&self, n: usize) {
        let now = self.used.fetch_add(n, Ordering::AcqRel) + n;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    /// Whether more than 3/4 of the budget is held: a paused fan-out resumes
    /// only below this mark.
    pub fn over_resume_mark(&self) -> bool {
        self.used() > self.resume_mark()
    }

    fn resume_mark(&self) -> usize {
        self.limit / 4 * 3
    }

    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let after = self.used.fetch_sub(n, Ordering::AcqRel) - n;
        // Wake a paused hub only once it can resume (not for every write).
        if after <= self.resume_mark() && self.waiting.load(Ordering::Acquire) {
            self.room.notify_one();
        }
    }

    /// Waits until the budget is under its resume mark (or `timeout`). The
    /// caller checks again.
    pub async fn wait_for_room(&self, timeout: Duration) {
        self.waiting.store(true, Ordering::Release);
        if self.over_resume_mark() {
            let _ = tokio::time::timeout(timeout, self.room.notified()).await;
        }
        self.waiting.store(false, Ordering::Release);
    }
}

/// Bytes written and not yet returned to their [`OutboxBudget`]: a batch of
/// flushes returns them once, when this is dropped (or the budget changes).
/// Until then the budget counts them as held, which errs on the safe side.
#[derive(Debug, Default)]
pub struct Releases {
    budget: Option<Arc<OutboxBudget>>,
    bytes: usize,
}

impl Releases {
    fn add(&mut self, budget: &Arc<OutboxBudget>, bytes: usize) {
        if bytes == 0 {
            return;
        }
        match &self.budget {
            Some(held) if Arc::ptr_eq(held, budget) => self.bytes += bytes,
            _ => {
                self.settle();
                self.budget = Some(Arc::clone(budget));
                self.bytes = bytes;
            }
        }
    }

    /// Returns what is held to its budget now.
    fn settle(&mut self) {
        if let Some(budget) = &self.budget {
            budget.release(std::mem::take(&mut self.bytes));
        }
    }
}

impl Drop for Releases {
    fn drop(&mut self) {
        self.settle();
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
    /// 1013: the client sent requests faster than it read the replies.
    pub fn reply_flood(limits: OutboxLimits) -> CloseReason {
        CloseReason {
            code: 1013,
            reason: format!("slow consumer: more than {} bytes of replies unread", limits.max_reply_bytes),
        }
    }

    /// 1013: the oldest frame not yet written is older than the limit.
    pub fn reader_lag(lag: Duration, limit: Duration) -> CloseReason {
        CloseReason {
            code: 1013,
            reason: format!(
                "slow consumer: oldest undelivered message is {}s old (limit {}s)",
                lag.as_secs(),
                limit.as_secs()
            ),
        }
    }

    /// 1013: the global outbox budget stayed full and this reader was the
    /// furthest behind.
    pub fn furthest_behind(paused: Duration, budget: usize) -> CloseReason {
        CloseReason {
            code: 1013,
            reason: format!(
                "slow consumer: furthest behind while the server's {} MiB send budget was full for {}s",
                budget >> 20,
                paused.as_secs()
            ),
        }
    }

    /// 1013: a write to the socket made no progress within `timeout`.
    pub fn write_stalled(timeout: Duration) -> CloseReason {
        CloseReason { code: 1013, reason: format!("slow consumer: the socket took no data for {}s", timeout.as_secs()) }
    }

    /// 1013: a cluster edge lost its change stream for longer than it may
    /// serve stale data.
    pub fn stream_lost(stale: Duration) -> CloseReason {
        CloseReason {
            code: 1013,
            reason: format!("this node lost the change stream for over {} s; reconnect", stale.as_secs()),
        }
    }

    /// 1013: a cluster edge missed changes its stream no longer holds.
    pub fn stream_gap() -> CloseReason {
        CloseReason { code: 1013, reason: "this node missed changes the stream no longer holds; reconnect".into() }
    }

    /// 1006: the socket failed (reset, broken pipe). RFC 6455 reserves the
    /// code for exactly this and forbids sending it: no close frame follows.
    pub fn socket_failed() -> CloseReason {
        CloseReason { code: 1006, reason: "the socket failed".into() }
    }

    /// 1001 "going away": the server is shutting down.
    pub fn shutdown() -> CloseReason {
        CloseReason { code: 1001, reason: "server shutting down".into() }
    }
}

/// A push that did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The reply cap was reached; the outbox is now closed.
    #[error("outbox full; closed as a slow consumer")]
    Full,
    /// The outbox was already closed.
    #[error("outbox closed")]
    Closed,
}

/// One queued frame.
#[derive(Debug)]
struct Entry {
    /// When it was queued ([`now_ms`]).
    at: u64,
    frame: Bytes,
    /// Bytes already framed (tungstenite's control replies): written as
    /// they are, no header added.
    raw: bool,
    /// One of the connection's own replies (counted in `State::replies`
    /// until written).
    reply: bool,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Entry>,
    /// Charged bytes queued.
    queued: usize,
    /// Reply bytes queued and not yet written (with a socket), or queued
    /// since the writer last drained (without).
    replies: usize,
    /// Charged bytes handed to the writer and not yet written (no socket).
    in_flight: usize,
    /// When the oldest frame in the writer's hands was queued (no socket).
    in_flight_since: Option<u64>,
    /// Bytes of the front frame (header included) already on the socket.
    front_sent: usize,
    /// A close frame went out with a raw entry (tungstenite's answer to the
    /// peer's close): no other may follow.
    close_queued: bool,
    /// On the hub's list of outboxes to flush.
    listed: bool,
    closed: Option<CloseReason>,
    /// Closed with [`Outbox::close_now`]: the writer abandons its batch.
    discarded: bool,
}

/// What a [`Outbox::write_now`] left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Everything queued is on the socket.
    All,
    /// The socket's send buffer is full: wait until it is writable.
    Blocked,
    /// The socket failed (reset, broken pipe): nothing more can be sent.
    Failed,
}

/// The queue. Share it behind an `Arc`.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    discard: Notify,
    limits: OutboxLimits,
    budget: Arc<OutboxBudget>,
    /// The socket's write half: frames are written by [`Outbox::write_now`]
    /// and [`Outbox::flush`]. Without it (tools, tests), a writer takes
    /// them with [`Outbox::next_batch`].
    socket: Option<OwnedWriteHalf>,
    /// The socket's descriptor, kept beside the queue's lock: the hub's
    /// writes then touch no cold per-socket state but the kernel's.
    fd: Option<std::os::fd::RawFd>,
}

impl Outbox {
    /// An empty outbox with a budget of its own (tools and tests).
    pub fn new(limits: OutboxLimits) -> Outbox {
        Outbox::with_budget(limits, OutboxBudget::unlimited())
    }

    /// An empty outbox charging `budget`, whose frames a writer takes with
    /// [`Outbox::next_batch`].
    pub fn with_budget(limits: OutboxLimits, budget: Arc<OutboxBudget>) -> Outbox {
        Outbox::build(limits, budget, None)
    }

    fn build(limits: OutboxLimits, budget: Arc<OutboxBudget>, socket: Option<OwnedWriteHalf>) -> Outbox {
        let fd = socket.as_ref().map(|half| std::os::fd::AsRawFd::as_raw_fd(half.as_ref()));
        Outbox {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            discard: Notify::new(),
            limits,
            budget,
            socket,
            fd,
        }
    }

    /// An empty outbox charging `budget` that writes WebSocket frames to
    /// `socket` itself ([`Outbox::write_now`], [`Outbox::flush`]).
    pub fn with_socket(limits: OutboxLimits, budget: Arc<OutboxBudget>, socket: OwnedWriteHalf) -> Outbox {
        Outbox::build(limits, budget, Some(socket))
    }

    /// The socket's write half, when the outbox writes itself.
    pub fn socket(&self) -> Option<&OwnedWriteHalf> {
        self.socket.as_ref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a hub frame without waiting; `at` is [`now_ms`] (the hub reads
    /// the clock once per change).
    ///
    /// # Errors
    /// [`PushError::Closed`].
    pub fn push_at(&self, frame: Bytes, at: u64) -> Result<(), PushError> {
        self.enqueue(frame, at, Push::Hub).map(|_| ())
    }

    /// Queues a hub frame now.
    ///
    /// # Errors
    /// [`PushError::Closed`].
    pub fn push(&self, frame: Bytes) -> Result<(), PushError> {
        self.enqueue(frame, now_ms(), Push::Hub).map(|_| ())
    }

    /// Queues a hub frame without waking the writer: the caller
    /// [`flush`](Outbox::flush)es the outbox once its batch is queued (one
    /// write per socket per batch). Returns whether the caller must list
    /// the outbox for that flush (it was not listed yet).
    ///
    /// # Errors
    /// [`PushError::Closed`].
    pub fn push_deferred(&self, frame: Bytes, at: u64) -> Result<bool, PushError> {
        self.enqueue(frame, at, Push::Deferred)
    }

    /// Queues one of the connection's own replies.
    ///
    /// # Errors
    /// [`PushError::Full`] (and the outbox closes as a slow consumer) when
    /// the reply cap is reached, or [`PushError::Closed`].
    pub fn push_reply(&self, frame: Bytes) -> Result<(), PushError> {
        self.enqueue(frame, now_ms(), Push::Reply).map(|_| ())
    }

    /// Queues bytes already framed by the WebSocket library (its pong and
    /// close replies), counted as replies. After a close frame nothing else
    /// is queued: the outbox closes with `1000`.
    ///
    /// # Errors
    /// As [`Outbox::push_reply`].
    pub fn push_raw(&self, frames: Bytes) -> Result<(), PushError> {
        let close = socket::holds_close(&frames);
        self.enqueue(frames, now_ms(), Push::Raw)?;
        if close {
            let mut state = self.lock();
            state.close_queued = true;
            if state.closed.is_none() {
                state.closed = Some(CloseReason { code: 1000, reason: String::new() });
            }
        }
        Ok(())
    }

    fn enqueue(&self, frame: Bytes, at: u64, push: Push) -> Result<bool, PushError> {
        let reply = matches!(push, Push::Reply | Push::Raw);
        let mut state = self.lock();
        if state.closed.is_some() {
            return Err(PushError::Closed);
        }
        if reply && state.replies + frame.len() > self.limits.max_reply_bytes {
            drop(state);
            self.close_now(CloseReason::reply_flood(self.limits));
            return Err(PushError::Full);
        }
        let charge = frame.len() + ENTRY_OVERHEAD;
        if reply {
            state.replies += frame.len();
        }
        state.queued += charge;
        state.queue.push_back(Entry { at, frame, raw: matches!(push, Push::Raw), reply });
        self.budget.charge(charge);
        if matches!(push, Push::Deferred) {
            let list = !state.listed;
            state.listed = true;
            return Ok(list);
        }
        let first = state.queue.len() == 1;
        drop(state);
        if first {
            self.notify.notify_one();
        }
        Ok(false)
    }

    /// Writes what [`push_deferred`](Outbox::push_deferred) queued: on an
    /// outbox with a socket, at once and without waiting (the rest, if the
    /// socket is full, is left to the writer task, which is woken); without
    /// one, the writer is woken.
    pub fn flush(&self) {
        self.flush_into(&mut Releases::default());
    }

    /// [`flush`](Outbox::flush), the bytes written returned to the budget
    /// through `releases`: a pass over many outboxes returns them once, so
    /// the budget's counter is not bounced between the hub's and the
    /// flushers' cores once per delivery.
    pub fn flush_into(&self, releases: &mut Releases) {
        if self.socket.is_none() {
            self.lock().listed = false;
            self.notify.notify_one();
            return;
        }
        match self.write(socket::Via::Direct, releases) {
            Written::All => {}
            // The writer waits for the socket.
            Written::Blocked => self.notify.notify_one(),
            // Nothing more can be sent: drop what is queued, so the hub
            // stops queueing for this socket; its session ends.
            Written::Failed => {
                self.close_now(CloseReason::socket_failed());
            }
        }
    }

    /// Writes the queue's frames to the socket, from the front, without
    /// waiting: as much as the socket takes. Frames fully written release
    /// their bytes. Without a socket: [`Written::All`]. For the task that
    /// awaits the socket's `writable()` after [`Written::Blocked`].
    pub fn write_now(&self) -> Written {
        self.write(socket::Via::Tokio, &mut Releases::default())
    }

    fn write(&self, via: socket::Via, releases: &mut Releases) -> Written {
        let (Some(socket), Some(fd)) = (&self.socket, self.fd) else { return Written::All };
        let mut state = self.lock();
        if via == socket::Via::Direct {
            // The hub's flush: what it queued is being written now.
            state.listed = false;
        }
        let mut released = 0;
        let result = loop {
            if state.queue.is_empty() {
                state.replies = 0;
                break Written::All;
            }
            let frames = state.queue.iter().map(|e| (&e.frame, e.raw));
            let sent = match socket::write_some(socket, fd, via, frames, state.front_sent) {
                Ok(0) => break Written::Failed,
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break Written::Blocked,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break Written::Failed,
            };
            let (done, front_sent) =
                socket::advance(state.queue.iter().map(|e| socket::wire_len(&e.frame, e.raw)), state.front_sent, sent);
            let mut replies = 0;
            for entry in state.queue.drain(..done) {
                released += entry.frame.len() + ENTRY_OVERHEAD;
                if entry.reply {
                    replies += entry.frame.len();
                }
            }
            state.replies = state.replies.saturating_sub(replies);
            state.front_sent = front_sent;
            if front_sent > 0 {
                // The socket took part of a frame: its buffer is full.
                break Written::Blocked;
            }
        };
        state.queued -= released;
        if state.queue.capacity() > 64 && state.queue.len() < 16 {
            state.queue.shrink_to_fit();
        }
        drop(state);
        releases.add(&self.budget, released);
        result
    }

    /// Whether a close frame was already queued (the WebSocket library's
    /// answer to the peer's close).
    pub fn close_queued(&self) -> bool {
        self.lock().close_queued
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

    /// Closes the outbox and discards what is queued (a slow consumer): the
    /// writer sends `reason` next. A frame already partly on the socket
    /// stays, to be finished first. Returns whether this call closed it.
    pub fn close_now(&self, reason: CloseReason) -> bool {
        let mut state = self.lock();
        let first = state.closed.is_none();
        if first {
            state.closed = Some(reason);
        }
        let keep = usize::from(state.front_sent > 0).min(state.queue.len());
        let mut released = 0;
        for entry in state.queue.drain(keep..) {
            released += entry.frame.len() + ENTRY_OVERHEAD;
        }
        state.queued -= released;
        if state.queue.is_empty() {
            state.queue = VecDeque::new();
        }
        state.replies = 0;
        state.discarded = true;
        drop(state);
        self.budget.release(released);
        self.notify.notify_one();
        self.discard.notify_one();
        first
    }

    /// Resolves once the outbox was closed with [`Outbox::close_now`]: a
    /// writer stuck on a full socket stops writing the batch it holds and
    /// sends the close frame instead.
    pub async fn discarded(&self) {
        loop {
            if self.lock().discarded {
                return;
            }
            self.discard.notified().await;
        }
    }

    /// Why the outbox was closed, once it is.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.lock().closed.clone()
    }

    /// Whether the outbox is closed.
    pub fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }

    /// Frames and charged bytes queued (not counting the writer's hands).
    pub fn depth(&self) -> (usize, usize) {
        let state = self.lock();
        (state.queue.len(), state.queued)
    }

    /// Whether the connection's own replies fill half their cap: the
    /// session then stops reading requests until the writer drains them, so
    /// a client that sends faster than it reads is slowed, not closed.
    pub fn replies_backlogged(&self) -> bool {
        self.lock().replies >= self.limits.max_reply_bytes / 2
    }

    /// Charged bytes queued or being written.
    pub fn held(&self) -> usize {
        let state = self.lock();
        state.queued + state.in_flight
    }

    /// Age of the oldest frame not yet written, at `now` ([`now_ms`]).
    pub fn lag(&self, now: u64) -> Duration {
        let state = self.lock();
        let oldest = match (state.in_flight_since, state.queue.front()) {
            (Some(a), Some(b)) => a.min(b.at),
            (Some(a), None) => a,
            (None, Some(b)) => b.at,
            (None, None) => return Duration::ZERO,
        };
        Duration::from_millis(now.saturating_sub(oldest))
    }

    fn take_all(state: &mut State, out: &mut Vec<Bytes>) {
        if let Some(front) = state.queue.front() {
            state.in_flight_since = Some(state.in_flight_since.map_or(front.at, |s| s.min(front.at)));
        }
        out.extend(state.queue.drain(..).map(|e| e.frame));
        state.in_flight += std::mem::take(&mut state.queued);
        state.replies = 0;
        if state.queue.capacity() > 64 {
            state.queue.shrink_to_fit();
        }
    }

    /// Moves every queued frame into `out` without waiting (they count as
    /// in flight until [`Outbox::written`]); returns how many. For outboxes
    /// without a socket.
    pub fn try_drain(&self, out: &mut Vec<Bytes>) -> usize {
        let mut state = self.lock();
        state.listed = false;
        let n = state.queue.len();
        Outbox::take_all(&mut state, out);
        drop(state);
        self.written();
        n
    }

    /// Moves every queued frame into `out`, waiting for at least one; call
    /// [`Outbox::written`] once they are on the socket. For outboxes without
    /// a socket.
    ///
    /// # Errors
    /// The close reason once the outbox is closed and drained (a
    /// [`close_now`](Outbox::close_now) discards the queue first).
    pub async fn next_batch(&self, out: &mut Vec<Bytes>) -> Result<(), CloseReason> {
        loop {
            {
                let mut state = self.lock();
                if !state.queue.is_empty() {
                    Outbox::take_all(&mut state, out);
                    return Ok(());
                }
                if let Some(reason) = &state.closed {
                    return Err(reason.clone());
                }
            }
            self.notify.notified().await;
        }
    }

    /// Waits until there is something to write (`Ok`), or the outbox is
    /// closed and everything queued was written (`Err` with the reason).
    /// For outboxes with a socket: the caller then calls
    /// [`Outbox::write_now`].
    pub async fn wait_work(&self) -> Result<(), CloseReason> {
        loop {
            {
                let state = self.lock();
                if !state.queue.is_empty() {
                    return Ok(());
                }
                if let Some(reason) = &state.closed {
                    return Err(reason.clone());
                }
            }
            self.notify.notified().await;
        }
    }

    /// The frames last taken by [`Outbox::next_batch`] were written:
    /// releases their bytes.
    pub fn written(&self) {
        let mut state = self.lock();
        let released = std::mem::take(&mut state.in_flight);
        state.in_flight_since = None;
        drop(state);
        self.budget.release(released);
    }
}

/// How a frame is queued.
#[derive(Debug, Clone, Copy)]
enum Push {
    /// A hub frame; the writer is woken.
    Hub,
    /// A hub frame; the caller flushes.
    Deferred,
    /// A connection's own reply.
    Reply,
    /// An already framed reply of the WebSocket library.
    Raw,
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.budget.release(state.queued + state.in_flight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replies_are_capped_and_a_flooder_is_closed() {
        let outbox = Outbox::new(OutboxLimits { max_reply_bytes: 10 });
        outbox.push_reply(Bytes::from_static(b"abcd")).unwrap();
        outbox.push_reply(Bytes::from_static(b"efgh")).unwrap();
        assert_eq!(outbox.depth().0, 2);
        assert_eq!(outbox.push_reply(Bytes::from_static(b"ijk")), Err(PushError::Full));
        assert_eq!(outbox.push(Bytes::from_static(b"x")), Err(PushError::Closed));
        let mut out = Vec::new();
        let err = outbox.next_batch(&mut out).await.unwrap_err();
        assert_eq!(err.code, 1013);
        assert!(out.is_empty(), "a slow consumer's queue is discarded");
    }

    #[tokio::test]
    async fn hub_frames_are_not_capped_per_socket_but_charge_the_budget_until_written() {
        let budget = OutboxBudget::new(1000);
        let a = Outbox::with_budget(OutboxLimits { max_reply_bytes: 10 }, Arc::clone(&budget));
        let b = Outbox::with_budget(OutboxLimits::default(), Arc::clone(&budget));
        for _ in 0..20 {
            a.push(Bytes::from_static(&[0; 50])).unwrap();
        }
        b.push(Bytes::from_static(&[0; 50])).unwrap();
        assert!(budget.exhausted());
        assert_eq!(budget.used(), 21 * (50 + ENTRY_OVERHEAD));
        let mut out = Vec::new();
        a.next_batch(&mut out).await.unwrap();
        assert_eq!(out.len(), 20);
        assert_eq!(budget.used(), 21 * (50 + ENTRY_OVERHEAD), "in the writer's hands still counts");
        a.written();
        assert_eq!(budget.used(), 50 + ENTRY_OVERHEAD);
        drop(b);
        assert_eq!(budget.used(), 0, "a dropped outbox releases what it held");
    }

    #[tokio::test]
    async fn close_now_releases_and_lag_is_the_oldest_unwritten_frame() {
        let budget = OutboxBudget::new(1 << 20);
        let outbox = Outbox::with_budget(OutboxLimits::default(), Arc::clone(&budget));
        assert_eq!(outbox.lag(100), Duration::ZERO);
        outbox.push_at(Bytes::from_static(b"1"), 10).unwrap();
        outbox.push_at(Bytes::from_static(b"2"), 20).unwrap();
        assert_eq!(outbox.lag(1010), Duration::from_secs(1));
        let mut out = Vec::new();
        outbox.next_batch(&mut out).await.unwrap();
        outbox.push_at(Bytes::from_static(b"3"), 500).unwrap();
        assert_eq!(outbox.lag(1010), Duration::from_secs(1), "in flight since 10");
        outbox.written();
        assert_eq!(outbox.lag(1500), Duration::from_secs(1), "queued at 500");
        assert!(outbox.close_now(CloseReason::reader_lag(Duration::from_secs(31), Duration::from_secs(30))));
        assert_eq!(budget.used(), 0);
        assert!(!outbox.close_now(CloseReason::shutdown()), "the first reason wins");
        let err = outbox.next_batch(&mut out).await.unwrap_err();
        assert!(err.reason.contains("31s"), "{}", err.reason);
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
                        Ok(()) => {
                            got.append(&mut batch);
                            outbox.written();
                        }
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

    /// A socket pair: the outbox writes to `server`'s write half; the test
    /// reads what the client got.
    async fn socket_outbox(
        budget: Arc<OutboxBudget>,
    ) -> (Outbox, tokio::net::TcpStream, tokio::net::tcp::OwnedReadHalf) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (read, write) = server.into_split();
        (Outbox::with_socket(OutboxLimits::default(), budget, write), client, read)
    }

    /// Reads frames (unmasked, as a server sends them) until the close
    /// frame: (opcode, payload) each.
    async fn read_frames(client: &mut tokio::net::TcpStream) -> Vec<(u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let mut frames = Vec::new();
        loop {
            let mut head = [0u8; 2];
            client.read_exact(&mut head).await.unwrap();
            let len = match head[1] & 0x7f {
                126 => usize::from(client.read_u16().await.unwrap()),
                127 => client.read_u64().await.unwrap() as usize,
                n => usize::from(n),
            };
            let mut payload = vec![0u8; len];
            client.read_exact(&mut payload).await.unwrap();
            let op = head[0] & 0x0f;
            frames.push((op, payload));
            if op == 8 {
                return frames;
            }
        }
    }

    #[tokio::test]
    async fn deferred_frames_go_out_whole_and_in_order_through_a_full_socket() {
        let budget = OutboxBudget::new(1 << 30);
        let (outbox, mut client, _read) = socket_outbox(Arc::clone(&budget)).await;
        let outbox = Arc::new(outbox);
        // Far more than the socket buffers take: the hub's flush writes
        // what fits and leaves the rest to the writer.
        let frames: Vec<Bytes> =
            (0..2_000u32).map(|i| Bytes::from(format!("[{i},\"{}\"]", "x".repeat(9_000)))).collect();
        let mut listed = 0;
        for frame in &frames {
            listed += usize::from(outbox.push_deferred(frame.clone(), now_ms()).unwrap());
        }
        assert_eq!(listed, 1, "listed for the flush once");
        outbox.push_reply(Bytes::from_static(&[4, 0, 0, 0, 0])).unwrap();
        outbox.flush();
        assert!(outbox.depth().0 > 0, "the socket was full before everything was written");
        let writer = {
            let outbox = Arc::clone(&outbox);
            tokio::spawn(async move {
                let socket = outbox.socket().unwrap();
                loop {
                    match outbox.wait_work().await {
                        Err(_) => break,
                        Ok(()) => match outbox.write_now() {
                            Written::All => {}
                            Written::Blocked => socket.writable().await.unwrap(),
                            Written::Failed => panic!("socket failed"),
                        },
                    }
                }
                assert_eq!(outbox.write_now(), Written::All);
                let close = socket::close_frame(1000, "done");
                assert_eq!(socket.try_write(&close).unwrap(), close.len());
            })
        };
        outbox.close(CloseReason { code: 1000, reason: "done".into() });
        let got = read_frames(&mut client).await;
        writer.await.unwrap();
        assert_eq!(got.len(), frames.len() + 2);
        for (i, frame) in frames.iter().enumerate() {
            assert_eq!(got[i], (1, frame.to_vec()), "frame {i}: a text frame, whole, in order");
        }
        assert_eq!(got[frames.len()], (2, vec![4, 0, 0, 0, 0]), "a non-JSON frame is binary");
        assert_eq!(got[frames.len() + 1].0, 8);
        assert_eq!(budget.used(), 0, "everything written was released");
    }

    #[tokio::test]
    async fn close_now_keeps_a_frame_partly_on_the_socket_and_raw_close_frames_close() {
        let (outbox, _client, _read) = socket_outbox(OutboxBudget::unlimited()).await;
        // Fill the socket until a frame is cut.
        let big = Bytes::from(format!("[\"{}\"]", "y".repeat(100_000)));
        let mut blocked = false;
        for _ in 0..200 {
            outbox.push(big.clone()).unwrap();
            if outbox.write_now() == Written::Blocked {
                blocked = true;
                break;
            }
        }
        assert!(blocked);
        let before = outbox.depth().0;
        assert!(outbox.close_now(CloseReason::write_stalled(Duration::from_secs(1))));
        let after = outbox.depth().0;
        assert!(after <= 1 && after <= before, "only the frame already started stays ({before} → {after})");
        assert!(!outbox.close_queued());

        let (other, _client2, _read2) = socket_outbox(OutboxBudget::unlimited()).await;
        let mut pong_and_close = vec![0x8a, 0];
        pong_and_close.extend_from_slice(&socket::close_frame(1000, ""));
        other.push_raw(Bytes::from(pong_and_close)).unwrap();
        assert!(other.close_queued(), "the library answered the peer's close");
        assert_eq!(other.push(Bytes::from_static(b"[]")), Err(PushError::Closed), "nothing after a close frame");
        assert_eq!(other.write_now(), Written::All);
    }
}
