-- 0002 tables: dealerships, profiles, dealer_memberships, orders.
--
-- Status, type and role are text with CHECK constraints rather than enum types:
-- adding a value is a constraint swap instead of ALTER TYPE, and realtime
-- filters compare them as plain text.

-- Helpers that must not be reachable through the API live in `private`
-- (PostgREST exposes only the schemas it is told to; `private` is never one).
create schema if not exists private;
revoke all on schema private from public;

create or replace function private.set_updated_at() returns trigger
language plpgsql
set search_path = ''
as $$
begin
    new.updated_at := now();
    return new;
end
$$;

create table if not exists public.dealerships (
    id uuid primary key default gen_random_uuid(),
    name text not null,
    -- The code starts every order number ("NORTH-SALES-000001"), so it is
    -- restricted to characters that cannot make a number ambiguous.
    code text not null unique constraint dealerships_code_format check (code ~ '^[A-Z0-9]{1,20}$'),
    address jsonb,
    settings jsonb not null default '{}',
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

create table if not exists public.profiles (
    id uuid primary key references auth.users (id) on delete cascade,
    email text not null unique,
    full_name text,
    avatar_url text,
    role text not null default 'user',
    metadata jsonb not null default '{}',
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

create table if not exists public.dealer_memberships (
    id uuid primary key default gen_random_uuid(),
    user_id uuid not null references public.profiles (id) on delete cascade,
    dealership_id uuid not null references public.dealerships (id) on delete cascade,
    role text not null default 'user' constraint dealer_memberships_role_check check (role in ('admin', 'manager', 'user')),
    permissions jsonb not null default '{}',
    -- An inviter leaving must not delete the memberships they handed out.
    invited_by uuid references public.profiles (id) on delete set null,
    joined_at timestamptz not null default now(),
    -- One membership per user and dealership. This unique index is also the
    -- index every policy check uses (user_id, dealership_id → role); INCLUDE
    -- (role) makes those checks index-only.
    constraint dealer_memberships_user_dealership_key unique (user_id, dealership_id) include (role)
);

create table if not exists public.orders (
    id uuid primary key default gen_random_uuid(),
    -- Orders are business records: a dealership with orders cannot be deleted
    -- by accident; archive it or move the orders first.
    dealership_id uuid not null references public.dealerships (id) on delete restrict,
    -- Assigned by trigger (0003) when not given; immutable afterwards.
    order_number text not null unique,
    type text not null constraint orders_type_check check (type in ('sales', 'service', 'recon', 'carwash')),
    status text not null default 'pending'
        constraint orders_status_check check (status in ('draft', 'pending', 'in_progress', 'completed', 'cancelled')),
    customer_info jsonb not null constraint orders_customer_info_object check (jsonb_typeof(customer_info) = 'object'),
    vehicle_info jsonb,
    service_details jsonb,
    metadata jsonb not null default '{}',
    -- The creator is part of the audit trail: a profile that created orders
    -- cannot disappear silently.
    created_by uuid not null references public.profiles (id) on delete restrict,
    assigned_to uuid references public.profiles (id) on delete set null,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

create or replace trigger dealerships_set_updated_at
    before update on public.dealerships
    for each row execute function private.set_updated_at();
create or replace trigger profiles_set_updated_at
    before update on public.profiles
    for each row execute function private.set_updated_at();
create or replace trigger orders_set_updated_at
    before update on public.orders
    for each row execute function private.set_updated_at();

-- Table privileges as Supabase grants them to its API roles, narrowed where a
-- role has no business writing; Row Level Security (0004) then decides rows.
grant select on public.dealerships, public.profiles, public.dealer_memberships, public.orders to anon;
grant select on public.dealerships to authenticated;
grant select, insert, update, delete on public.orders, public.dealer_memberships to authenticated;
-- A user edits their own profile, but not its email (owned by auth.users) nor
-- its application role (that would be self-promotion).
grant select on public.profiles to authenticated;
grant insert (id, email, full_name, avatar_url, metadata) on public.profiles to authenticated;
grant update (full_name, avatar_url, metadata) on public.profiles to authenticated;
grant all on public.dealerships, public.profiles, public.dealer_memberships, public.orders to service_role;
