-- 0006 realtime: publish orders and dealer_memberships on `supabase_realtime`.
--
-- On Supabase the publication exists already (possibly FOR ALL TABLES, which
-- cannot take ADD TABLE and needs nothing), so it is created only when absent
-- and each table is added only when not yet a member.

do $$
declare
    v_table text;
begin
    if not exists (select from pg_catalog.pg_publication where pubname = 'supabase_realtime') then
        create publication supabase_realtime;
    end if;
    if (select puballtables from pg_catalog.pg_publication where pubname = 'supabase_realtime') then
        return;
    end if;
    foreach v_table in array array['orders', 'dealer_memberships'] loop
        if not exists (
            select from pg_catalog.pg_publication_tables
            where pubname = 'supabase_realtime' and schemaname = 'public' and tablename = v_table
        ) then
            execute format('alter publication supabase_realtime add table public.%I', v_table);
        end if;
    end loop;
end
$$;

-- The relay routes a DELETE by the row's dealership_id and decides whether an
-- UPDATE moved a row out of a user's view from the old row, so both tables must
-- log the full old row; FULL also lets the relay recover unchanged TOASTed
-- values (which pgoutput sends as "unchanged") from the old row.
alter table public.orders replica identity full;
alter table public.dealer_memberships replica identity full;
