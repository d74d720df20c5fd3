//! The realtime layer: Supabase Realtime's Phoenix protocol over WebSocket
//! (vsn 1.0.0 and 2.0.0), JWT auth, and the per-socket session that turns
//! joins into hub subscriptions.

pub mod auth;
