-- Index usage per table: how often each index is scanned, next to the table's
-- sequential scans. pg_stat_user_indexes names the table `relname` and the
-- index `indexrelname`. Counters run since the last statistics reset
-- (`stats_since`).
select s.schemaname,
       s.relname as table_name,
       s.indexrelname as index_name,
       s.idx_scan,
       s.idx_tup_read,
       s.idx_tup_fetch,
       pg_size_pretty(pg_relation_size(s.indexrelid)) as index_size,
       t.seq_scan as table_seq_scan,
       t.seq_tup_read as table_seq_tup_read,
       round(100.0 * t.idx_scan / nullif(t.idx_scan + t.seq_scan, 0), 1) as table_pct_index_scans,
       (select d.stats_reset from pg_catalog.pg_stat_database d where d.datname = current_database()) as stats_since
from pg_catalog.pg_stat_user_indexes s
join pg_catalog.pg_stat_user_tables t on t.relid = s.relid
order by s.schemaname, s.relname, s.idx_scan desc, s.indexrelname;
