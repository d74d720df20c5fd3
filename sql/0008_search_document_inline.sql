-- The full-text search document, made inlinable.
--
-- 0005 declared public.order_search_document with `set search_path = ''`. A
-- function with a SET clause is never inlined: every row written to orders
-- (each INSERT, and each UPDATE that is not HOT — any change of status,
-- dealership or the indexed jsonb) called it through the SQL-function
-- executor, saving and restoring the GUC around each call. Measured under
-- `walcast load --rate 5000 --writers 4 --batch 10`, that call was ~6 % of
-- the machine's CPU (docs/benchmarks.md, "E4 and the database's share").
--
-- Here the body names everything it uses by schema — the function, the text
-- search configuration, the types and every operator — so no search_path can
-- change what it does, and PostgreSQL inlines it into the index expression
-- and into queries that call it. The result is identical (same expression),
-- so orders_search_idx stays valid; no reindex.
create or replace function public.order_search_document(order_number text, customer_info jsonb, vehicle_info jsonb)
returns tsvector
language sql
immutable
parallel safe
as $$
    select pg_catalog.to_tsvector('pg_catalog.simple'::pg_catalog.regconfig,
        coalesce(order_number, '') operator(pg_catalog.||) ' ' operator(pg_catalog.||)
        coalesce(customer_info operator(pg_catalog.->>) 'name', '') operator(pg_catalog.||) ' ' operator(pg_catalog.||)
        coalesce(customer_info operator(pg_catalog.->>) 'first_name', '') operator(pg_catalog.||) ' ' operator(pg_catalog.||)
        coalesce(customer_info operator(pg_catalog.->>) 'last_name', '') operator(pg_catalog.||) ' ' operator(pg_catalog.||)
        coalesce(vehicle_info operator(pg_catalog.->>) 'vin', ''))
$$;
-- CREATE OR REPLACE keeps a function's SET clauses only when it repeats them:
-- this removes 0005's.
