-- Indexes never scanned since the statistics were reset, largest first: drop
-- candidates. Indexes that enforce a constraint (primary key, unique,
-- exclusion) are left out, as they are needed whether or not they are read.
-- Check a standby's own statistics before dropping: its reads do not show here.
select s.schemaname,
       s.relname as table_name,
       s.indexrelname as index_name,
       pg_size_pretty(pg_relation_size(s.indexrelid)) as index_size,
       pg_relation_size(s.indexrelid) as index_bytes,
       s.idx_scan,
       pg_get_indexdef(s.indexrelid) as definition,
       (select d.stats_reset from pg_catalog.pg_stat_database d where d.datname = current_database()) as stats_since
from pg_catalog.pg_stat_user_indexes s
join pg_catalog.pg_index i on i.indexrelid = s.indexrelid
where s.idx_scan = 0
  and not i.indisunique
  and not i.indisprimary
  and not exists (select from pg_catalog.pg_constraint c where c.conindid = s.indexrelid)
order by pg_relation_size(s.indexrelid) desc, s.indexrelname;
