//! STUB (replaced by the scale-wire branch).
#![allow(missing_docs, dead_code, clippy::new_without_default)]
use crate::hub::StageEvent;
use crate::lsn::Lsn;
use crate::policy::plan::Loaded;
#[derive(Debug, Clone)]
pub struct PolicyState {
    pub loaded: Loaded,
    pub ahead: bool,
    pub handled: Lsn,
}
pub fn encode(_state: &PolicyState) -> Result<Vec<u8>, SnapshotError> {
    Err(SnapshotError::Stub)
}
pub fn decode(_bytes: &[u8]) -> Result<PolicyState, SnapshotError> {
    Err(SnapshotError::Stub)
}
pub struct Mirror;
impl Mirror {
    pub fn new() -> Mirror {
        Mirror
    }
    pub fn apply(&mut self, _event: &StageEvent) {}
    pub fn state(&self) -> Option<PolicyState> {
        None
    }
}
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("stub")]
    Stub,
}
