-- Slowest statements by total execution time, from pg_stat_statements
-- (PostgreSQL 13+ names: total_exec_time, mean_exec_time, max_exec_time).
--
-- Works whether or not the extension is there: the statistics query is built
-- as text and run through query_to_xml only when pg_stat_statements is both
-- created in this database and loaded (shared_preload_libraries); otherwise the
-- result is a single row whose `note` says what to do. The extension may live
-- in any schema (Supabase puts it in `extensions`), so it is qualified.
with ext as (
    select e.extnamespace::regnamespace::text as schema_name,
           current_setting('shared_preload_libraries') ~ '(^|[\s,])"?pg_stat_statements"?([\s,]|$)' as loaded
    from pg_catalog.pg_extension e
    where e.extname = 'pg_stat_statements'
    union all
    select null, false
    limit 1
)
select stats.*
from ext,
lateral xmltable('/table/row' passing query_to_xml(
    case
        when ext.schema_name is not null and ext.loaded then format($q$
            select left(regexp_replace(s.query, '\s+', ' ', 'g'), 200) as query,
                   s.calls,
                   round(s.total_exec_time::numeric, 2) as total_ms,
                   round(s.mean_exec_time::numeric, 3) as mean_ms,
                   round(s.max_exec_time::numeric, 2) as max_ms,
                   s.rows,
                   round((100 * s.total_exec_time / nullif(sum(s.total_exec_time) over (), 0))::numeric, 2) as percent_of_total,
                   null::text as note
            from %s.pg_stat_statements s
            where s.dbid = (select oid from pg_catalog.pg_database where datname = current_database())
            order by s.total_exec_time desc
            limit 25$q$, quote_ident(ext.schema_name))
        when ext.schema_name is not null then
            $q$select null::text as query, null::bigint as calls, null::numeric as total_ms, null::numeric as mean_ms,
                      null::numeric as max_ms, null::bigint as rows, null::numeric as percent_of_total,
                      'pg_stat_statements is created but not loaded: add it to shared_preload_libraries and restart PostgreSQL' as note$q$
        else
            $q$select null::text as query, null::bigint as calls, null::numeric as total_ms, null::numeric as mean_ms,
                      null::numeric as max_ms, null::bigint as rows, null::numeric as percent_of_total,
                      'pg_stat_statements is not installed in this database: add it to shared_preload_libraries, restart, then CREATE EXTENSION pg_stat_statements' as note$q$
    end, false, false, '')
    columns query text, calls bigint, total_ms numeric, mean_ms numeric, max_ms numeric,
            rows bigint, percent_of_total numeric, note text) as stats;
