-- 0001 auth shim: the parts of Supabase's `auth` schema and roles that the
-- policies rely on. A Supabase database already has all of it, so every object
-- is created only where absent and nothing existing is replaced.

-- Roles as Supabase defines them: no login, no inheritance; service_role
-- bypasses Row Level Security. Roles are cluster-wide, so another database
-- being migrated at the same moment may create them first: that is fine.
do $$
declare
    r record;
begin
    for r in
        select * from (values ('anon', false), ('authenticated', false), ('service_role', true)) as v (name, bypass)
    loop
        if not exists (select from pg_catalog.pg_roles where rolname = r.name) then
            begin
                execute format('create role %I nologin noinherit%s', r.name,
                               case when r.bypass then ' bypassrls' else '' end);
            exception when duplicate_object or unique_violation then
                null; -- created concurrently by another migration run
            end;
        end if;
    end loop;
end
$$;

create schema if not exists auth;

create table if not exists auth.users (
    id uuid primary key default gen_random_uuid(),
    email text,
    role text,
    raw_app_meta_data jsonb not null default '{}',
    raw_user_meta_data jsonb not null default '{}',
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

-- auth.uid(), auth.role(), auth.jwt() read the claims PostgREST (and walcast's
-- tests) put into the `request.jwt.claims` setting, falling back to the older
-- per-claim settings, exactly as Supabase's own definitions do. Created only
-- when absent so Supabase's versions are never replaced.
do $$
begin
    if to_regprocedure('auth.uid()') is null then
        create function auth.uid() returns uuid
        language sql stable
        as $fn$
            select coalesce(
                nullif(current_setting('request.jwt.claim.sub', true), ''),
                (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
            )::uuid
        $fn$;
    end if;
    if to_regprocedure('auth.role()') is null then
        create function auth.role() returns text
        language sql stable
        as $fn$
            select coalesce(
                nullif(current_setting('request.jwt.claim.role', true), ''),
                (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
            )::text
        $fn$;
    end if;
    if to_regprocedure('auth.jwt()') is null then
        create function auth.jwt() returns jsonb
        language sql stable
        as $fn$
            select coalesce(
                nullif(current_setting('request.jwt.claim', true), ''),
                nullif(current_setting('request.jwt.claims', true), '')
            )::jsonb
        $fn$;
    end if;
end
$$;

-- The grants Supabase gives: the API roles may use the schemas (tables are
-- granted one by one in 0002; RLS decides rows).
grant usage on schema public to anon, authenticated, service_role;
grant usage on schema auth to anon, authenticated, service_role;
grant execute on function auth.uid(), auth.role(), auth.jwt() to anon, authenticated, service_role;
grant all on auth.users to service_role;
