//! STUB (replaced by the scale-wire branch).
#![allow(missing_docs, dead_code, clippy::new_without_default)]
use crate::change::TxEvent;
use crate::lsn::Lsn;
pub struct Chunk {
    pub payload: bytes::Bytes,
    pub commit_lsn: Lsn,
    pub index: u32,
    pub end_lsn: Option<Lsn>,
}
pub struct TxChunker;
impl TxChunker {
    pub fn new(_max_bytes: usize) -> TxChunker {
        TxChunker
    }
    pub fn push(&mut self, _event: &TxEvent, _out: &mut Vec<Chunk>) -> Result<(), WireError> {
        Ok(())
    }
    pub fn reset(&mut self) {}
}
pub struct TxReader;
impl TxReader {
    pub fn new() -> TxReader {
        TxReader
    }
    pub fn read(&mut self, _index: u32, _payload: &[u8], _out: &mut Vec<TxEvent>) -> Result<(), WireError> {
        Ok(())
    }
    pub fn reset(&mut self) {}
    pub fn in_transaction(&self) -> bool {
        false
    }
}
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("stub")]
    Stub,
}
