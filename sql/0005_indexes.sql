-- 0005 indexes: the brief's query paths, the foreign keys, and full-text search.
-- (dealer_memberships (user_id, dealership_id) is the unique constraint of
-- 0002; a second identical index would only cost writes.)

-- Dashboard lists: a dealership's orders by status, and by type, newest first.
create index if not exists orders_dealership_status_idx
    on public.orders (dealership_id, status);
create index if not exists orders_dealership_type_created_idx
    on public.orders (dealership_id, type, created_at desc);
-- The work queue: open orders, most recently touched first. Partial, so
-- completed and cancelled history does not bloat it.
create index if not exists orders_dealership_open_updated_idx
    on public.orders (dealership_id, updated_at desc)
    where status in ('pending', 'in_progress');

-- Containment queries (vehicle_info @> '{"make": "Volvo"}'); jsonb_path_ops is
-- smaller and faster than the default opclass for @>, which is the only
-- operator these columns are queried with.
create index if not exists orders_vehicle_info_idx on public.orders using gin (vehicle_info jsonb_path_ops);
create index if not exists orders_metadata_idx on public.orders using gin (metadata jsonb_path_ops);

-- Full-text search over order number, customer name and VIN. The 'simple'
-- configuration (no stemming, no stop words) suits codes and names; the
-- function is IMMUTABLE (explicit configuration) so it can be indexed, and
-- queries use the same call:
--   where public.order_search_document(order_number, customer_info, vehicle_info)
--         @@ websearch_to_tsquery('simple', 'WVW 1HGCM')
create or replace function public.order_search_document(order_number text, customer_info jsonb, vehicle_info jsonb)
returns tsvector
language sql
immutable
parallel safe
set search_path = ''
as $$
    select to_tsvector('simple'::regconfig,
        coalesce(order_number, '') || ' ' ||
        coalesce(customer_info ->> 'name', '') || ' ' ||
        coalesce(customer_info ->> 'first_name', '') || ' ' ||
        coalesce(customer_info ->> 'last_name', '') || ' ' ||
        coalesce(vehicle_info ->> 'vin', ''))
$$;
create index if not exists orders_search_idx
    on public.orders using gin (public.order_search_document(order_number, customer_info, vehicle_info));

-- Foreign keys: deleting or updating a referenced profile must not scan orders.
create index if not exists orders_created_by_idx on public.orders (created_by);
create index if not exists orders_assigned_to_idx on public.orders (assigned_to) where assigned_to is not null;
create index if not exists dealer_memberships_invited_by_idx
    on public.dealer_memberships (invited_by) where invited_by is not null;
-- A dealership's members (policies on co-members, cascades from dealerships,
-- the relay's initial load).
create index if not exists dealer_memberships_dealership_user_idx
    on public.dealer_memberships (dealership_id, user_id) include (role);
