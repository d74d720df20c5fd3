-- Broadcast from Database: the `realtime` objects Supabase Realtime reads
-- (the `realtime.messages` table, `realtime.topic()`, `realtime.send()`,
-- `realtime.send_binary()`, `realtime.broadcast_changes()`), created only
-- where absent: a Supabase database already has them, and they are never
-- replaced or altered. Plus walcast's own publication `walcast_messages`,
-- which walcast streams on its slot next to the user's publication (the
-- user's `supabase_realtime` publication is never touched).
--
-- Timestamps are `timestamp` without time zone, in UTC: defaults and
-- partition bounds are computed `at time zone 'utc'`, so the session's
-- TimeZone does not matter. `walcast serve` keeps the daily partitions
-- (yesterday … today+3, dropping those that ended more than 72 h ago); this
-- file creates the first ones so `realtime.send` works right away.
--
-- Idempotent; needs a superuser like 0001 (it owns what it creates).

create schema if not exists realtime;

do $$
declare
  role_name text;
begin
  if to_regclass('realtime.messages') is not null then
    return; -- Supabase's (or an earlier) table: left exactly as it is
  end if;
  create table realtime.messages (
    id             uuid      not null default gen_random_uuid(),
    topic          text      not null,
    extension      text      not null,
    event          text,
    payload        jsonb,
    binary_payload bytea,
    private        boolean   default false,
    inserted_at    timestamp not null default (now() at time zone 'utc'),
    updated_at     timestamp not null default (now() at time zone 'utc'),
    constraint messages_pkey primary key (id, inserted_at),
    constraint messages_payload_exclusive check (payload is null or binary_payload is null)
  ) partition by range (inserted_at);
  alter table realtime.messages enable row level security;
  create index messages_inserted_at_topic_index on only realtime.messages (inserted_at desc, topic)
    where extension = 'broadcast' and private is true;
  foreach role_name in array array['anon', 'authenticated', 'service_role'] loop
    if exists (select 1 from pg_catalog.pg_roles where rolname = role_name) then
      execute format('grant usage on schema realtime to %I', role_name);
      execute format('grant select, insert, update on realtime.messages to %I', role_name);
    end if;
  end loop;
end $$;

-- The first partitions (walcast serve keeps them from then on).
do $$
declare
  today date := (now() at time zone 'utc')::date;
  day date;
  name text;
  i int;
begin
  if (select c.relkind from pg_catalog.pg_class c where c.oid = to_regclass('realtime.messages')) <> 'p' then
    return; -- not partitioned: nothing to keep
  end if;
  for i in -1 .. 3 loop
    day := today + i;
    name := 'messages_' || to_char(day, 'YYYY_MM_DD');
    if to_regclass(format('realtime.%I', name)) is null then
      execute format('create table realtime.%I partition of realtime.messages for values from (%L) to (%L)',
                     name, day::timestamp, (day + 1)::timestamp);
    end if;
  end loop;
end $$;

do $$
begin
  if to_regprocedure('realtime.topic()') is null then
    create function realtime.topic() returns text
    language sql stable
    as $f$ select nullif(current_setting('realtime.topic', true), '') $f$;
  end if;

  -- Runs with the caller's rights (an INSERT policy on realtime.messages
  -- decides who may send); never fails the caller: any error is a WARNING
  -- and nothing is sent. A payload without `id` gets the row's id.
  if to_regprocedure('realtime.send(jsonb, text, text, boolean)') is null then
    create function realtime.send(payload jsonb, event text, topic text, private boolean default true)
    returns void
    language plpgsql
    as $f$
    declare
      new_id uuid := gen_random_uuid();
    begin
      begin
        if jsonb_typeof(payload) is distinct from 'object' then
          raise exception 'the payload must be a JSON object, not %', coalesce(jsonb_typeof(payload), 'NULL');
        end if;
        perform set_config('realtime.topic', topic, true);
        insert into realtime.messages (id, topic, extension, event, private, payload)
        values (new_id, topic, 'broadcast', event, private,
                case when payload ? 'id' then payload else jsonb_set(payload, '{id}', to_jsonb(new_id)) end);
      exception when others then
        raise warning 'WarnSendingBroadcastMessage: %', sqlerrm;
      end;
    end
    $f$;
  end if;

  -- The same for raw bytes (no id is added).
  if to_regprocedure('realtime.send_binary(bytea, text, text, boolean)') is null then
    create function realtime.send_binary(payload bytea, event text, topic text, private boolean default true)
    returns void
    language plpgsql
    as $f$
    begin
      begin
        perform set_config('realtime.topic', topic, true);
        insert into realtime.messages (id, topic, extension, event, private, binary_payload)
        values (gen_random_uuid(), topic, 'broadcast', event, private, payload);
      exception when others then
        raise warning 'WarnSendingBroadcastMessage: %', sqlerrm;
      end;
    end
    $f$;
  end if;

  -- For row triggers: sends {record, old_record, operation, table, schema}
  -- on `topic_name` (private).
  if to_regprocedure('realtime.broadcast_changes(text, text, text, text, text, record, record, text)') is null then
    create function realtime.broadcast_changes(topic_name text, event_name text, operation text, table_name text,
                                               table_schema text, new record, old record, level text default 'ROW')
    returns void
    language plpgsql
    as $f$
    begin
      if level = 'STATEMENT' then
        raise exception 'function can only be triggered for each row, not for each statement';
      end if;
      if operation not in ('INSERT', 'UPDATE', 'DELETE') then
        raise exception 'Unexpected operation type: %', operation;
      end if;
      perform realtime.send(
        jsonb_build_object('old_record', old, 'record', new, 'operation', operation,
                           'table', table_name, 'schema', table_schema),
        event_name, topic_name);
    exception when others then
      raise exception 'Failed to process the row: %', sqlerrm;
    end
    $f$;
  end if;
end $$;

-- walcast's publication: inserts only (updates and deletes are never
-- broadcast), under the root table's name whatever the partition.
do $$
begin
  if not exists (select 1 from pg_catalog.pg_publication where pubname = 'walcast_messages') then
    create publication walcast_messages for table realtime.messages
      with (publish = 'insert', publish_via_partition_root = true);
  end if;
end $$;
