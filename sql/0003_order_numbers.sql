-- 0003 order numbers: "<DEALERSHIP CODE>-<TYPE>-000001", one gap-free counter
-- per (dealership, type), assigned when an order is inserted without one.
--
-- A counter row is incremented with INSERT … ON CONFLICT … DO UPDATE …
-- RETURNING, which takes a row lock: concurrent inserts for the same
-- (dealership, type) queue on that row until the earlier transaction ends, so
-- no two orders get the same number (MAX()+1 reads a snapshot and races), and a
-- rolled-back insert rolls its increment back too. Different dealerships and
-- types never wait on each other.

create table if not exists private.order_number_counters (
    dealership_id uuid not null references public.dealerships (id) on delete cascade,
    type text not null,
    last_value bigint not null,
    primary key (dealership_id, type)
);
-- Reached only through the SECURITY DEFINER trigger below.
alter table private.order_number_counters enable row level security;

create or replace function private.assign_order_number() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
    v_code text;
    v_next bigint;
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
    insert into private.order_number_counters as c (dealership_id, type, last_value)
    values (new.dealership_id, new.type, 1)
    on conflict (dealership_id, type) do update set last_value = c.last_value + 1
    returning c.last_value into v_next;
    -- At least six digits; never truncated past 999999.
    new.order_number := v_code || '-' || upper(new.type) || '-'
        || lpad(v_next::text, greatest(6, length(v_next::text)), '0');
    return new;
end
$$;
revoke all on function private.assign_order_number() from public;

create or replace function private.forbid_order_number_change() returns trigger
language plpgsql
set search_path = ''
as $$
begin
    raise exception 'order_number cannot be changed (order %: % to %)', old.id, old.order_number, new.order_number
        using errcode = 'check_violation', hint = 'order numbers are permanent; create a new order instead';
end
$$;

create or replace trigger orders_assign_order_number
    before insert on public.orders
    for each row execute function private.assign_order_number();
create or replace trigger orders_order_number_immutable
    before update on public.orders
    for each row
    when (new.order_number is distinct from old.order_number)
    execute function private.forbid_order_number_change();
