-- walcast's own objects (not the demo schema): an event trigger that tells a
-- running walcast, in WAL order, that policies, privileges, row level
-- security or helper functions changed. It writes a transactional logical
-- decoding message (prefix 'walcast-policy') inside the DDL's own
-- transaction; walcast re-reads the policies at that transaction's commit.
--
-- Idempotent. Event triggers need a superuser to create (and fire for every
-- role's DDL). Without this trigger walcast polls the catalog instead (see
-- docs/policies.md and `walcast check`).

do $$
begin
  if not (select rolsuper from pg_catalog.pg_roles where rolname = current_user) then
    raise exception 'walcast setup needs a superuser: creating an event trigger requires one (role % is not)', current_user
      using hint = 'run `walcast setup` (or `walcast migrate`) as a superuser; without the trigger walcast polls the policies (docs/policies.md)';
  end if;
end $$;

create schema if not exists walcast;

-- Counts the DDL the trigger reported. Each message carries the count after
-- its DDL; walcast reads the count with the catalog, so it knows whether the
-- catalog it read is the state right after that DDL or already includes a
-- later one (then it judges like a catch-up until the stream reaches it).
create table if not exists walcast.policy_epoch (
  id boolean primary key default true check (id),
  epoch bigint not null default 0
);
insert into walcast.policy_epoch (id, epoch) values (true, 0) on conflict (id) do nothing;
grant usage on schema walcast to public;
grant select on walcast.policy_epoch to public;

-- security definer: any role's DDL may count and write the message.
create or replace function walcast.policy_changed() returns event_trigger
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  objects jsonb;
  n bigint;
begin
  begin
    update walcast.policy_epoch set epoch = epoch + 1 where id returning epoch into n;
  exception when undefined_table then
    n := null; -- dropped by hand: the messages still go, without a count
  end;
  if tg_event = 'sql_drop' then
    select coalesce(jsonb_agg(jsonb_build_object('type', object_type, 'oid', objid, 'identity', object_identity)), '[]')
      into objects
      from pg_event_trigger_dropped_objects();
  else
    select coalesce(jsonb_agg(jsonb_build_object('type', object_type, 'oid', objid, 'identity', object_identity)), '[]')
      into objects
      from pg_event_trigger_ddl_commands();
  end if;
  perform pg_logical_emit_message(
    true,
    'walcast-policy',
    jsonb_build_object('event', tg_event, 'tag', tg_tag, 'epoch', n, 'objects', objects)::text
  );
end
$$;

drop event trigger if exists walcast_policy_changes;
create event trigger walcast_policy_changes on ddl_command_end
  when tag in (
    'CREATE POLICY', 'ALTER POLICY', 'DROP POLICY',
    'GRANT', 'REVOKE',
    'CREATE TABLE', 'ALTER TABLE', 'DROP TABLE',
    'CREATE FUNCTION', 'ALTER FUNCTION', 'DROP FUNCTION',
    'CREATE PUBLICATION', 'ALTER PUBLICATION', 'DROP PUBLICATION'
  )
  execute function walcast.policy_changed();

drop event trigger if exists walcast_policy_drops;
create event trigger walcast_policy_drops on sql_drop
  when tag in ('DROP POLICY', 'DROP FUNCTION', 'DROP TABLE', 'ALTER TABLE')
  execute function walcast.policy_changed();
