//! A live replication source + change assembler, the way the relay runs them,
//! for tests: events leave one by one on a bounded channel, each Commit's end
//! LSN is acknowledged after its events were handed on, and an optional
//! capture writer records the raw stream as `walcast record` does.

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use walcast::capture::{CaptureMeta, CaptureWriter};
use walcast::change::{Assembler, Change, TxEvent};
use walcast::replication::{run_source, AckHandle, SlotOptions, SourceConfig, SourceEvent, StreamConfig, WalEvent};

/// A running source + assembler.
pub struct Pipeline {
    events: mpsc::Receiver<TxEvent>,
    stop: tokio_util::sync::CancellationToken,
    /// The assembler's peak buffered bytes, updated as it runs.
    pub peak_buffered: Arc<AtomicUsize>,
    task: Option<tokio::task::JoinHandle<Option<CaptureWriter<std::fs::File>>>>,
}

impl Pipeline {
    /// Protocol 1 from `slot` (created when missing) on `publication`.
    pub async fn start(url: &str, slot: &str, publication: &str) -> Pipeline {
        Pipeline::start_with(url, SlotOptions::new(slot, publication), None).await
    }

    /// With explicit slot options; with `capture`, every WAL event is also
    /// written there before it is assembled.
    pub async fn start_with(url: &str, slot: SlotOptions, capture: Option<std::fs::File>) -> Pipeline {
        Pipeline::start_assembling(url, slot, capture, Assembler::new()).await
    }

    /// With explicit slot options and `assembler` (e.g. one from
    /// [`Assembler::with_spill`]); committed streamed transactions are
    /// drained 256 events at a time, as the relay does.
    pub async fn start_assembling(
        url: &str,
        slot: SlotOptions,
        capture: Option<std::fs::File>,
        mut assembler: Assembler,
    ) -> Pipeline {
        let config = SourceConfig {
            stream: StreamConfig { status_interval: Duration::from_millis(200), ..StreamConfig::default() },
            ..SourceConfig::new(tokio_postgres::Config::from_str(url).unwrap(), slot.clone())
        };
        let (tx, mut rx) = mpsc::channel(256);
        let stop = tokio_util::sync::CancellationToken::new();
        let ack = AckHandle::default();
        tokio::spawn(run_source(config, tx, ack.clone(), stop.clone()));
        let (out_tx, out_rx) = mpsc::channel(1024);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let peak_buffered = Arc::new(AtomicUsize::new(0));
        let peak = Arc::clone(&peak_buffered);
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut capture_file = capture;
            let mut writer: Option<CaptureWriter<std::fs::File>> = None;
            let mut events = Vec::new();
            while let Some(event) = rx.recv().await {
                match event {
                    SourceEvent::Snapshot(lease) => lease.release(),
                    SourceEvent::Started { confirmed, .. } => {
                        assembler.reset();
                        if let Some(file) = capture_file.take() {
                            let meta = CaptureMeta {
                                slot: slot.slot.clone(),
                                publications: slot.publications.clone(),
                                proto_version: slot.proto_version,
                                streaming: slot.streaming,
                                start_lsn: confirmed,
                                ..CaptureMeta::default()
                            };
                            writer = Some(CaptureWriter::new(file, &meta).expect("capture header"));
                        }
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    SourceEvent::Wal(batch) => {
                        for event in batch {
                            if let Some(w) = writer.as_mut() {
                                w.write(&event).expect("capture write");
                            }
                            let WalEvent::XLogData { data, .. } = event else { continue };
                            assembler.push(&data, &mut events).expect("assemble");
                            peak.store(assembler.peak_buffered_bytes(), Ordering::Relaxed);
                            loop {
                                for e in events.drain(..) {
                                    let end = if let TxEvent::Commit(info) = &e { Some(info.end_lsn) } else { None };
                                    if out_tx.send(e).await.is_err() {
                                        return writer;
                                    }
                                    if let Some(end) = end {
                                        ack.ack(end);
                                    }
                                }
                                if !assembler.has_pending() {
                                    break;
                                }
                                assembler.drain_pending(&mut events, 256).expect("drain");
                            }
                        }
                    }
                }
            }
            writer
        });
        tokio::time::timeout(Duration::from_secs(30), ready_rx).await.expect("source started").unwrap();
        Pipeline { events: out_rx, stop, peak_buffered, task: Some(task) }
    }

    /// The next event (30 s at most).
    pub async fn next_event(&mut self) -> TxEvent {
        tokio::time::timeout(Duration::from_secs(30), self.events.recv()).await.expect("an event").expect("open")
    }

    /// The next whole transaction, Begin to Commit.
    pub async fn next_tx(&mut self) -> Vec<TxEvent> {
        let mut tx = Vec::new();
        loop {
            let event = self.next_event().await;
            let commit = matches!(event, TxEvent::Commit(_));
            tx.push(event);
            if commit {
                return tx;
            }
        }
    }

    /// Whether an event arrives within `wait`.
    pub async fn quiet_for(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.events.recv()).await.is_err()
    }

    /// Stops the source; returns the capture writer, finished by the caller.
    pub async fn stop(mut self) -> Option<CaptureWriter<std::fs::File>> {
        self.stop.cancel();
        self.events.close();
        while self.events.recv().await.is_some() {}
        self.task.take()?.await.ok().flatten()
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The changes of a transaction.
pub fn changes(tx: &[TxEvent]) -> Vec<&Change> {
    tx.iter().filter_map(|e| if let TxEvent::Change(c) = e { Some(c) } else { None }).collect()
}
