-- 0004 Row Level Security on the four tables.
--
-- Every policy asks "which dealerships is the caller a member of (with which
-- role)?". The answer comes from SECURITY DEFINER helpers in `private`:
-- - they read dealer_memberships as its owner, so the RLS on that table does
--   not hide the caller's own memberships from the policy (a policy subquery
--   run as the caller would see only what the SELECT policy allows, and a
--   policy on dealer_memberships that queried dealer_memberships would recurse);
-- - they are STABLE with an empty search_path (nothing can be shadowed);
-- - policies call them as `col in (select private.…())` and the caller's id as
--   `(select auth.uid())`: both become one-time subplans per statement rather
--   than a function call per row, and the IN list hashes.
--
-- anon gets no policy at all (sees and writes nothing); service_role has
-- BYPASSRLS; authenticated gets exactly the policies below. The realtime relay
-- mirrors the SELECT policies (orders and dealer_memberships: members of the
-- row's dealership) in memory.

create or replace function private.member_dealership_ids(p_roles text[] default null)
returns setof uuid
language sql
stable
security definer
set search_path = ''
as $$
    select m.dealership_id
    from public.dealer_memberships m
    where m.user_id = (select auth.uid())
      and (p_roles is null or m.role = any (p_roles))
$$;

create or replace function private.co_member_ids()
returns setof uuid
language sql
stable
security definer
set search_path = ''
as $$
    select distinct theirs.user_id
    from public.dealer_memberships mine
    join public.dealer_memberships theirs on theirs.dealership_id = mine.dealership_id
    where mine.user_id = (select auth.uid())
$$;

revoke all on function private.member_dealership_ids(text[]), private.co_member_ids() from public;
grant usage on schema private to authenticated;
grant execute on function private.member_dealership_ids(text[]), private.co_member_ids() to authenticated;

alter table public.dealerships enable row level security;
alter table public.profiles enable row level security;
alter table public.dealer_memberships enable row level security;
alter table public.orders enable row level security;

-- dealerships: members read their dealerships; writes go through service_role.
drop policy if exists dealerships_select_member on public.dealerships;
create policy dealerships_select_member on public.dealerships
    for select to authenticated
    using (id in (select private.member_dealership_ids()));

-- orders
drop policy if exists orders_select_member on public.orders;
create policy orders_select_member on public.orders
    for select to authenticated
    using (dealership_id in (select private.member_dealership_ids()));

drop policy if exists orders_insert_member on public.orders;
create policy orders_insert_member on public.orders
    for insert to authenticated
    with check (
        created_by = (select auth.uid())
        and dealership_id in (select private.member_dealership_ids(array['admin', 'manager', 'user']))
    );

-- UPDATE: admins any order of their dealership; managers the orders they
-- created; users their own orders while still drafts. USING judges the row as
-- it is, WITH CHECK the row as it would become: a user may submit a draft
-- (draft → pending) but not edit it afterwards, and nobody can move an order
-- into a dealership where they lack the same right.
drop policy if exists orders_update_by_role on public.orders;
create policy orders_update_by_role on public.orders
    for update to authenticated
    using (
        dealership_id in (select private.member_dealership_ids(array['admin']))
        or (created_by = (select auth.uid())
            and dealership_id in (select private.member_dealership_ids(array['manager'])))
        or (created_by = (select auth.uid()) and status = 'draft'
            and dealership_id in (select private.member_dealership_ids(array['user'])))
    )
    with check (
        dealership_id in (select private.member_dealership_ids(array['admin']))
        or (created_by = (select auth.uid())
            and dealership_id in (select private.member_dealership_ids(array['manager'])))
        or (created_by = (select auth.uid()) and status in ('draft', 'pending')
            and dealership_id in (select private.member_dealership_ids(array['user'])))
    );

drop policy if exists orders_delete_admin on public.orders;
create policy orders_delete_admin on public.orders
    for delete to authenticated
    using (dealership_id in (select private.member_dealership_ids(array['admin'])));

-- dealer_memberships: members see their co-members; the dealership's admins
-- manage them.
drop policy if exists dealer_memberships_select_member on public.dealer_memberships;
create policy dealer_memberships_select_member on public.dealer_memberships
    for select to authenticated
    using (dealership_id in (select private.member_dealership_ids()));

drop policy if exists dealer_memberships_insert_admin on public.dealer_memberships;
create policy dealer_memberships_insert_admin on public.dealer_memberships
    for insert to authenticated
    with check (dealership_id in (select private.member_dealership_ids(array['admin'])));

drop policy if exists dealer_memberships_update_admin on public.dealer_memberships;
create policy dealer_memberships_update_admin on public.dealer_memberships
    for update to authenticated
    using (dealership_id in (select private.member_dealership_ids(array['admin'])))
    with check (dealership_id in (select private.member_dealership_ids(array['admin'])));

drop policy if exists dealer_memberships_delete_admin on public.dealer_memberships;
create policy dealer_memberships_delete_admin on public.dealer_memberships
    for delete to authenticated
    using (dealership_id in (select private.member_dealership_ids(array['admin'])));

-- profiles: your own profile read/write; your co-members' read-only.
drop policy if exists profiles_select_self_or_co_member on public.profiles;
create policy profiles_select_self_or_co_member on public.profiles
    for select to authenticated
    using (id = (select auth.uid()) or id in (select private.co_member_ids()));

drop policy if exists profiles_insert_self on public.profiles;
create policy profiles_insert_self on public.profiles
    for insert to authenticated
    with check (id = (select auth.uid()));

drop policy if exists profiles_update_self on public.profiles;
create policy profiles_update_self on public.profiles
    for update to authenticated
    using (id = (select auth.uid()))
    with check (id = (select auth.uid()));
