//! Write load and a change witness for fault tests: a writer task that
//! inserts single-row orders at a steady rate (reconnecting when the database
//! goes away) and records each committed transaction's id, xid and WAL
//! position; a `service_role` WebSocket client that records every order it
//! receives; and the slot's state as PostgreSQL sees it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;
use walcast::hub::Vsn;
use walcast::lsn::Lsn;

use super::server::{token, Ws};

/// One committed write.
#[derive(Debug, Clone, Copy)]
pub struct Write {
    /// The order's id.
    pub id: Uuid,
    /// The transaction's 32-bit xid (as pgoutput reports it).
    pub xid: u32,
    /// The WAL insert position inside the transaction: its commit record
    /// ends after it.
    pub lsn: Lsn,
    /// When the commit was confirmed to the writer.
    pub at: Instant,
}

/// Connects without TLS, driving the connection on the current runtime.
pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A value every written order carries (`customer_info.name`), for
/// asserting that logs hold no row values.
pub const ROW_VALUE: &str = "Ada Lovelace";

/// Inserts one order in its own transaction; returns what was committed.
pub async fn write_order(client: &Client, dealership: Uuid, user: Uuid) -> Result<Write, tokio_postgres::Error> {
    let row = client
        .query_one(
            "insert into public.orders (dealership_id, type, customer_info, created_by) \
             values ($1, 'sales', '{\"name\": \"Ada Lovelace\"}', $2) \
             returning id, (txid_current() % 4294967296)::int8, pg_current_wal_insert_lsn()::text",
            &[&dealership, &user],
        )
        .await?;
    let xid: i64 = row.get(1);
    let lsn: String = row.get(2);
    Ok(Write { id: row.get(0), xid: xid as u32, lsn: lsn.parse().expect("an LSN"), at: Instant::now() })
}

/// A task writing single-row orders at a steady rate until stopped.
pub struct OrderWriter {
    written: Arc<Mutex<Vec<Write>>>,
    errors: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl OrderWriter {
    /// Starts writing one order every `every` to `url` (at most `max`). A
    /// failed write drops the connection; the next tick reconnects. Only
    /// writes whose commit was confirmed are recorded.
    pub fn spawn(url: &str, dealership: Uuid, user: Uuid, every: Duration, max: Option<usize>) -> OrderWriter {
        let written = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(AtomicU64::new(0));
        let (stop, mut stop_rx) = watch::channel(false);
        let url = url.to_owned();
        let task = {
            let written = Arc::clone(&written);
            let errors = Arc::clone(&errors);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut client: Option<Client> = None;
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop_rx.changed() => return,
                    }
                    if max.is_some_and(|max| written.lock().unwrap().len() >= max) {
                        return;
                    }
                    if client.as_ref().is_none_or(Client::is_closed) {
                        match tokio::time::timeout(Duration::from_secs(2), connect(&url)).await {
                            Ok(Ok(c)) => client = Some(c),
                            _ => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        }
                    }
                    let result = tokio::time::timeout(
                        Duration::from_secs(5),
                        write_order(client.as_ref().unwrap(), dealership, user),
                    )
                    .await;
                    match result {
                        Ok(Ok(write)) => written.lock().unwrap().push(write),
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            client = None;
                        }
                    }
                }
            })
        };
        OrderWriter { written, errors, stop, task }
    }

    /// Writes committed so far.
    pub fn count(&self) -> usize {
        self.written.lock().unwrap().len()
    }

    /// The writes committed so far.
    pub fn written(&self) -> Vec<Write> {
        self.written.lock().unwrap().clone()
    }

    /// Failed writes and connection attempts so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` writes committed; panics after `wait`.
    pub async fn wait_count(&self, n: usize, wait: Duration) {
        let deadline = Instant::now() + wait;
        while self.count() < n {
            assert!(Instant::now() < deadline, "the writer committed only {} of {n} writes in {wait:?}", self.count());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops (or, with a `max`, waits until it is done) and returns every write.
    pub async fn finish(self) -> Vec<Write> {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("the writer stops").unwrap();
        self.written.lock().unwrap().clone()
    }

    /// Waits (at most `wait`) for a writer with a `max` to write them all.
    pub async fn join(self, wait: Duration) -> Vec<Write> {
        let OrderWriter { written, task, stop, .. } = self;
        tokio::time::timeout(wait, task).await.expect("the writer finishes in time").unwrap();
        drop(stop);
        let written = written.lock().unwrap().clone();
        written
    }
}

/// A `service_role` WebSocket client subscribed to every INSERT on
/// `public.orders`, recording the ids it receives (heartbeats every 5 s).
pub struct ChangeWitness {
    ids: Arc<Mutex<Vec<Uuid>>>,
    /// When each of `ids` arrived (same order).
    times: Arc<Mutex<Vec<Instant>>>,
    closed: Arc<AtomicBool>,
    close_code: Arc<Mutex<Option<u16>>>,
    task: JoinHandle<()>,
}

impl ChangeWitness {
    /// Connects to `addr` and subscribes; returns once subscribed.
    pub async fn subscribe(addr: SocketAddr) -> ChangeWitness {
        ChangeWitness::subscribe_as(addr, &token("service_role", None, 3600)).await
    }

    /// As [`ChangeWitness::subscribe`], as the holder of `jwt` (row level
    /// security decides what it receives).
    pub async fn subscribe_as(addr: SocketAddr, jwt: &str) -> ChangeWitness {
        let mut ws = Ws::connect(addr, "/realtime/v1/websocket", jwt, Some(Vsn::V2)).await;
        let topic = "realtime:faults-witness";
        ws.subscribe(topic, json!([{"event": "INSERT", "schema": "public", "table": "orders"}]), None).await;
        let ids = Arc::new(Mutex::new(Vec::new()));
        let times = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(AtomicBool::new(false));
        let close_code = Arc::new(Mutex::new(None));
        let task = {
            let ids = Arc::clone(&ids);
            let times = Arc::clone(&times);
            let closed = Arc::clone(&closed);
            let close_code = Arc::clone(&close_code);
            tokio::spawn(async move {
                let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = heartbeat.tick() => { ws.send(None, "phoenix", "heartbeat", json!({})).await; }
                        message = ws.ws.next() => match message {
                            Some(Ok(Message::Text(text))) => {
                                let frame = ws.decode(text.as_str());
                                if frame.topic == topic && frame.event == "postgres_changes" {
                                    let id = frame.payload["data"]["record"]["id"].as_str().expect("record.id");
                                    ids.lock().unwrap().push(id.parse().expect("a uuid"));
                                    times.lock().unwrap().push(Instant::now());
                                }
                            }
                            Some(Ok(Message::Close(frame))) => {
                                *close_code.lock().unwrap() = frame.map(|f| u16::from(f.code));
                                closed.store(true, Ordering::SeqCst);
                                return;
                            }
                            Some(Err(_)) | None => {
                                closed.store(true, Ordering::SeqCst);
                                return;
                            }
                            Some(Ok(_)) => {}
                        },
                    }
                }
            })
        };
        ChangeWitness { ids, times, closed, close_code, task }
    }

    /// The ids received so far, in arrival order.
    pub fn ids(&self) -> Vec<Uuid> {
        self.ids.lock().unwrap().clone()
    }

    /// When `id` arrived, if it did.
    pub fn arrival(&self, id: &Uuid) -> Option<Instant> {
        let at = self.ids.lock().unwrap().iter().position(|i| i == id)?;
        self.times.lock().unwrap().get(at).copied()
    }

    /// Whether the socket closed.
    pub fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Waits (at most `wait`) for the socket to close; returns the close
    /// frame's code (`None` without one). Panics if it stays open.
    pub async fn wait_closed(&self, wait: Duration) -> Option<u16> {
        let deadline = Instant::now() + wait;
        while !self.closed() {
            assert!(Instant::now() < deadline, "the socket stayed open for {wait:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        *self.close_code.lock().unwrap()
    }

    /// Waits (at most `wait`) until every id in `expected` arrived; returns
    /// the ids still missing then (empty on success).
    pub async fn wait_for(&self, expected: &[Uuid], wait: Duration) -> Vec<Uuid> {
        let deadline = Instant::now() + wait;
        loop {
            let seen: std::collections::HashSet<Uuid> = self.ids().into_iter().collect();
            let missing: Vec<Uuid> = expected.iter().filter(|id| !seen.contains(id)).copied().collect();
            if missing.is_empty() || Instant::now() >= deadline || self.closed() {
                return missing;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChangeWitness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, Copy)]
pub struct SlotState {
    /// The walsender streaming from it.
    pub active_pid: Option<i32>,
    /// `confirmed_flush_lsn`.
    pub confirmed: Option<Lsn>,
}

/// The slot's state; `None` when it does not exist.
pub async fn slot_state(client: &Client, slot: &str) -> Option<SlotState> {
    let row = client
        .query_opt(
            "select active_pid, confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await
        .expect("read pg_replication_slots")?;
    let confirmed: Option<String> = row.get(1);
    Some(SlotState { active_pid: row.get(0), confirmed: confirmed.map(|c| c.parse().expect("an LSN")) })
}

/// Polls `check` every 20 ms until it returns `Some`; panics with `what`
/// after `wait`.
pub async fn poll<T, F, Fut>(what: &str, wait: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + wait;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {wait:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
