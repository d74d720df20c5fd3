-- 0007 order numbers in linear time: the counter row is locked once per
-- (transaction, dealership, type) and written once per statement.
--
-- 0003 incremented the counter row once per inserted order. In a bulk insert
-- every increment is another version of the same row in one transaction, and
-- each increment first walks the versions before it (none can be pruned while
-- the transaction runs), so a 50,000-row insert spent almost all its time in
-- the trigger. Numbers stay the same ("<CODE>-<TYPE>-000001", gap-free, per
-- (dealership, type)); only the bookkeeping changes:
--
-- - BEFORE INSERT, per row (private.assign_order_number, replaced here): the
--   first order of a (dealership, type) in a transaction locks its counter row
--   (SELECT … FOR UPDATE, creating it if missing) and keeps
--   "<value in the table>:<last number handed out>:<ctid of the row>" in a
--   transaction-local setting named after the key; later orders only bump the
--   middle part. The first number a key hands out in a statement also appends
--   the key to walcast_order_number.pending.
-- - AFTER INSERT, per statement (private.flush_order_numbers): each pending key
--   writes its last number to the counter row, once, and the setting becomes
--   "<n>:<n>:<new ctid>". The write addresses the row by ctid (a TID scan)
--   rather than through the primary key, which would walk every version this
--   transaction left behind: so many statements in one transaction stay
--   linear too. The ctid is only kept while this transaction holds the row
--   lock, so nothing else can move the row in between.
--
-- Why this keeps the guarantees of 0003:
-- - race-free: the row lock is held from the first number to the end of the
--   transaction, as before; a concurrent transaction waits on its own first
--   SELECT … FOR UPDATE and then (READ COMMITTED) reads the committed value.
--   Under REPEATABLE READ or SERIALIZABLE it gets a serialization failure
--   instead, as the upsert of 0003 did: retry the transaction.
-- - gap-free across rollbacks: set_config(…, true) values are undone with the
--   (sub)transaction that set them, exactly like the counter row's update, and
--   both change within the same statement; so after ROLLBACK TO SAVEPOINT (or
--   a PL/pgSQL exception block) setting, table, ctid and lock agree again. A
--   row lock taken by the parent survives a subtransaction's update being
--   rolled back.
-- - a transaction-local setting is only a cache: the statement-end write
--   requires the row at that ctid to be the key's row and to still hold the
--   value the cache started from (under the row lock), otherwise it raises, so
--   a setting forged with set_config cannot produce duplicates or move a
--   counter backwards.
--
-- Setting names: walcast_order_number.d<dealership id as 32 hex digits>_<type
-- as UTF-8 hex>, which is a valid custom setting name for any type text (the
-- CHECK on orders.type runs after this trigger).

create or replace function private.assign_order_number() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
    v_code text;
    v_key text;
    v_state text;
    v_base bigint;
    v_next bigint;
    v_row tid;
    v_pending text;
begin
    if new.order_number is not null then
        return new;
    end if;
    if new.type is null then
        raise not_null_violation using
            message = 'null value in column "type" of relation "orders" violates not-null constraint',
            column = 'type', table = 'orders', schema = 'public';
    end if;
    select d.code into v_code from public.dealerships d where d.id = new.dealership_id;
    if v_code is null then
        -- Let the foreign key report the missing dealership.
        return new;
    end if;
    v_key := 'walcast_order_number.d' || replace(new.dealership_id::text, '-', '') || '_'
        || encode(convert_to(new.type, 'UTF8'), 'hex');
    v_state := nullif(current_setting(v_key, true), '');
    if v_state is null then
        -- First number of this key in this transaction: take the row lock,
        -- held until the transaction ends.
        select c.last_value, c.ctid into v_base, v_row
        from private.order_number_counters c
        where c.dealership_id = new.dealership_id and c.type = new.type
        for update;
        if not found then
            insert into private.order_number_counters (dealership_id, type, last_value)
            values (new.dealership_id, new.type, 0)
            on conflict (dealership_id, type) do nothing;
            select c.last_value, c.ctid into strict v_base, v_row
            from private.order_number_counters c
            where c.dealership_id = new.dealership_id and c.type = new.type
            for update;
        end if;
        v_next := v_base;
    else
        v_base := split_part(v_state, ':', 1)::bigint;
        v_next := split_part(v_state, ':', 2)::bigint;
        v_row := split_part(v_state, ':', 3)::tid;
    end if;
    if v_next = v_base then
        -- First number of this key in this statement: flush it at the end.
        v_pending := nullif(current_setting('walcast_order_number.pending', true), '');
        perform set_config('walcast_order_number.pending',
            case when v_pending is null then v_key else v_pending || ',' || v_key end, true);
    end if;
    v_next := v_next + 1;
    perform set_config(v_key, v_base || ':' || v_next || ':' || v_row, true);
    -- At least six digits; never truncated past 999999.
    new.order_number := v_code || '-' || upper(new.type) || '-'
        || lpad(v_next::text, greatest(6, length(v_next::text)), '0');
    return new;
end
$$;
revoke all on function private.assign_order_number() from public;

create or replace function private.flush_order_numbers() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
    v_pending text;
    v_key text;
    v_state text;
    v_base bigint;
    v_next bigint;
    v_row tid;
    v_dealership_id uuid;
    v_type text;
    v_rows bigint;
begin
    v_pending := nullif(current_setting('walcast_order_number.pending', true), '');
    if v_pending is null then
        return null;
    end if;
    foreach v_key in array string_to_array(v_pending, ',') loop
        v_state := current_setting(v_key);
        v_base := split_part(v_state, ':', 1)::bigint;
        v_next := split_part(v_state, ':', 2)::bigint;
        v_row := split_part(v_state, ':', 3)::tid;
        -- walcast_order_number.d<32 hex>_<type hex>
        v_dealership_id := substr(v_key, 23, 32)::uuid;
        v_type := convert_from(decode(substr(v_key, 56), 'hex'), 'UTF8');
        update private.order_number_counters c
        set last_value = v_next
        where c.ctid = v_row and c.dealership_id = v_dealership_id and c.type = v_type and c.last_value = v_base
        returning c.ctid into v_row;
        get diagnostics v_rows = row_count;
        if v_rows <> 1 then
            raise exception 'order number counter for dealership % type % is not at %', v_dealership_id, v_type, v_base
                using errcode = 'internal_error',
                hint = 'the transaction-local setting ' || v_key || ' was changed outside the order number trigger';
        end if;
        perform set_config(v_key, v_next || ':' || v_next || ':' || v_row, true);
    end loop;
    perform set_config('walcast_order_number.pending', '', true);
    return null;
end
$$;
revoke all on function private.flush_order_numbers() from public;

create or replace trigger orders_flush_order_numbers
    after insert on public.orders
    for each statement execute function private.flush_order_numbers();
