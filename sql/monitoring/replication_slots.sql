-- Replication slots: how far each consumer lags and how much WAL it holds back.
-- `retained_wal` is what the server must keep for the slot (from restart_lsn);
-- `confirmed_lag` is what a logical consumer has not yet acknowledged.
-- wal_status: reserved/extended are healthy, unreserved means the slot is
-- about to pass max_slot_wal_keep_size, lost means it was invalidated (drop and
-- recreate it; the consumer missed changes). safe_wal_size is how much more WAL
-- can be written before that happens (null when max_slot_wal_keep_size = -1).
with pos as (
    select case when pg_is_in_recovery() then pg_last_wal_receive_lsn() else pg_current_wal_lsn() end as current_lsn
)
select s.slot_name,
       s.plugin,
       s.slot_type,
       s.database,
       s.temporary,
       s.active,
       s.active_pid,
       s.wal_status,
       s.restart_lsn,
       s.confirmed_flush_lsn,
       pg_size_pretty(pg_wal_lsn_diff(pos.current_lsn, s.restart_lsn)) as retained_wal,
       pg_wal_lsn_diff(pos.current_lsn, s.restart_lsn)::bigint as retained_bytes,
       pg_size_pretty(pg_wal_lsn_diff(pos.current_lsn, s.confirmed_flush_lsn)) as confirmed_lag,
       pg_wal_lsn_diff(pos.current_lsn, s.confirmed_flush_lsn)::bigint as confirmed_lag_bytes,
       pg_size_pretty(s.safe_wal_size) as safe_wal_size,
       current_setting('max_slot_wal_keep_size') as max_slot_wal_keep_size,
       r.application_name,
       r.state as sender_state,
       r.reply_time,
       r.write_lag,
       r.flush_lag
from pg_catalog.pg_replication_slots s
cross join pos
left join pg_catalog.pg_stat_replication r on r.pid = s.active_pid
order by pg_wal_lsn_diff(pos.current_lsn, s.restart_lsn) desc nulls last, s.slot_name;
