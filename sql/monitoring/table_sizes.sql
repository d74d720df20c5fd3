-- Table sizes, largest first: heap, indexes and TOAST separately, with the
-- planner's row estimate and vacuum state.
select n.nspname as schema_name,
       c.relname as table_name,
       pg_size_pretty(pg_total_relation_size(c.oid)) as total_size,
       pg_size_pretty(pg_relation_size(c.oid)) as table_size,
       pg_size_pretty(pg_indexes_size(c.oid)) as indexes_size,
       pg_size_pretty(pg_total_relation_size(c.oid) - pg_relation_size(c.oid) - pg_indexes_size(c.oid)) as toast_size,
       pg_total_relation_size(c.oid) as total_bytes,
       greatest(c.reltuples, 0)::bigint as estimated_rows,
       s.n_live_tup,
       s.n_dead_tup,
       s.last_autovacuum,
       s.last_autoanalyze
from pg_catalog.pg_class c
join pg_catalog.pg_namespace n on n.oid = c.relnamespace
left join pg_catalog.pg_stat_user_tables s on s.relid = c.oid
where c.relkind in ('r', 'p', 'm')
  and n.nspname not in ('pg_catalog', 'information_schema')
  and n.nspname !~ '^pg_toast'
order by pg_total_relation_size(c.oid) desc, n.nspname, c.relname
limit 50;
