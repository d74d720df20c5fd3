//! The demo data set (fixed ids) and its idempotent loader.

use serde_json::json;
use tokio_postgres::Client;
use uuid::Uuid;

use super::DemoError;

/// Advisory lock key serializing concurrent seeds ("walcdemo" in ASCII).
const SEED_LOCK_KEY: i64 = 0x7761_6c63_6465_6d6f;

/// A demo dealership.
pub(super) struct Dealership {
    pub(super) id: Uuid,
    pub(super) code: &'static str,
    pub(super) name: &'static str,
    pub(super) city: &'static str,
    /// The member the writer creates this dealership's orders as.
    pub(super) creator: Uuid,
}

/// A demo user (`auth.users` + `public.profiles`).
pub(super) struct User {
    pub(super) id: Uuid,
    pub(super) name: &'static str,
    pub(super) email: &'static str,
    pub(super) full_name: &'static str,
}

/// A demo membership.
pub(super) struct Membership {
    pub(super) id: Uuid,
    pub(super) user_id: Uuid,
    pub(super) dealership_id: Uuid,
    pub(super) role: &'static str,
}

/// One of the orders loaded on the first start.
struct SeedOrder {
    id: Uuid,
    dealership_id: Uuid,
    kind: &'static str,
    status: &'static str,
    customer: usize,
    vehicle: usize,
    created_by: Uuid,
    minutes_ago: i32,
}

pub(super) const NORTH: Uuid = Uuid::from_u128(0xd000_0000_0000_4000_8000_0000_0000_0001);
pub(super) const SOUTH: Uuid = Uuid::from_u128(0xd000_0000_0000_4000_8000_0000_0000_0002);
pub(super) const EAST: Uuid = Uuid::from_u128(0xd000_0000_0000_4000_8000_0000_0000_0003);

pub(super) const ALICE: Uuid = Uuid::from_u128(0xa11c_e000_0000_4000_8000_0000_0000_0001);
pub(super) const BOB: Uuid = Uuid::from_u128(0xb0b0_0000_0000_4000_8000_0000_0000_0002);
pub(super) const CAROL: Uuid = Uuid::from_u128(0xca20_1000_0000_4000_8000_0000_0000_0003);
pub(super) const DAVE: Uuid = Uuid::from_u128(0xda7e_0000_0000_4000_8000_0000_0000_0004);

pub(super) const DEALERSHIPS: [Dealership; 3] = [
    Dealership { id: NORTH, code: "NORTH", name: "Northside Motors", city: "Uppsala", creator: BOB },
    Dealership { id: SOUTH, code: "SOUTH", name: "Southgate Auto", city: "Malmö", creator: ALICE },
    Dealership { id: EAST, code: "EAST", name: "Eastwood Cars", city: "Visby", creator: CAROL },
];

pub(super) const USERS: [User; 4] = [
    User { id: ALICE, name: "alice", email: "alice@example.com", full_name: "Alice Andersson" },
    User { id: BOB, name: "bob", email: "bob@example.com", full_name: "Bob Berg" },
    User { id: CAROL, name: "carol", email: "carol@example.com", full_name: "Carol Carlsson" },
    User { id: DAVE, name: "dave", email: "dave@example.com", full_name: "Dave Dahl" },
];

const fn membership_id(n: u128) -> Uuid {
    Uuid::from_u128(0x3e3b_0000_0000_4000_8000_0000_0000_0000 | n)
}

pub(super) const MEMBERSHIPS: [Membership; 4] = [
    Membership { id: membership_id(1), user_id: ALICE, dealership_id: NORTH, role: "admin" },
    Membership { id: membership_id(2), user_id: ALICE, dealership_id: SOUTH, role: "user" },
    Membership { id: membership_id(3), user_id: BOB, dealership_id: NORTH, role: "user" },
    Membership { id: membership_id(4), user_id: CAROL, dealership_id: EAST, role: "manager" },
];

/// Customer names (writer and seed).
pub(super) const CUSTOMERS: [&str; 12] = [
    "Ada Lovelace",
    "Grace Hopper",
    "Alan Turing",
    "Katherine Johnson",
    "Edsger Dijkstra",
    "Barbara Liskov",
    "Donald Knuth",
    "Margaret Hamilton",
    "Ken Thompson",
    "Frances Allen",
    "John McCarthy",
    "Radia Perlman",
];

/// Vehicles: make, model, year (writer and seed).
pub(super) const VEHICLES: [(&str, &str, i32); 10] = [
    ("Volvo", "XC60", 2023),
    ("Toyota", "Corolla", 2019),
    ("Ford", "Focus", 2018),
    ("Honda", "Civic", 2021),
    ("Volkswagen", "Golf", 2022),
    ("Subaru", "Outback", 2020),
    ("Mazda", "CX-5", 2021),
    ("Tesla", "Model 3", 2024),
    ("Kia", "Sportage", 2022),
    ("Skoda", "Octavia", 2020),
];

/// Order types, as the `orders_type_check` constraint allows.
pub(super) const ORDER_TYPES: [&str; 4] = ["sales", "service", "recon", "carwash"];

const fn order_id(n: u128) -> Uuid {
    Uuid::from_u128(0x0de2_0000_0000_4000_8000_0000_0000_0000 | n)
}

const SEED_ORDERS: [SeedOrder; 10] = [
    seed_order(1, NORTH, "sales", "pending", BOB, 95),
    seed_order(2, NORTH, "service", "in_progress", BOB, 80),
    seed_order(3, NORTH, "recon", "completed", ALICE, 70),
    seed_order(4, NORTH, "carwash", "draft", BOB, 60),
    seed_order(5, SOUTH, "sales", "pending", ALICE, 55),
    seed_order(6, SOUTH, "service", "completed", ALICE, 45),
    seed_order(7, SOUTH, "carwash", "cancelled", ALICE, 35),
    seed_order(8, EAST, "sales", "in_progress", CAROL, 25),
    seed_order(9, EAST, "service", "pending", CAROL, 15),
    seed_order(10, EAST, "recon", "pending", CAROL, 5),
];

const fn seed_order(
    n: usize,
    dealership_id: Uuid,
    kind: &'static str,
    status: &'static str,
    created_by: Uuid,
    minutes_ago: i32,
) -> SeedOrder {
    SeedOrder {
        id: order_id(n as u128),
        dealership_id,
        kind,
        status,
        customer: (n - 1) % CUSTOMERS.len(),
        vehicle: (n - 1) % VEHICLES.len(),
        created_by,
        minutes_ago,
    }
}

/// The ids of the demo dealerships.
pub(super) fn dealership_ids() -> Vec<Uuid> {
    DEALERSHIPS.iter().map(|d| d.id).collect()
}

/// `customer_info` for customer `i` of [`CUSTOMERS`].
pub(super) fn customer_info(i: usize) -> serde_json::Value {
    json!({"name": CUSTOMERS[i % CUSTOMERS.len()], "phone": format!("+46 70 555 {:04}", 1000 + i * 37)})
}

/// `vehicle_info` for vehicle `i` of [`VEHICLES`].
pub(super) fn vehicle_info(i: usize) -> serde_json::Value {
    let (make, model, year) = VEHICLES[i % VEHICLES.len()];
    json!({"make": make, "model": model, "year": year})
}

/// Loads the demo data set into a migrated database; idempotent.
///
/// In one transaction, serialized with concurrent seeds by an advisory lock:
/// the users (`auth.users` and `public.profiles`), dealerships and
/// memberships are inserted with their fixed ids, skipping rows that exist;
/// the ten seed orders only while the demo dealerships have no orders at all
/// (so orders the writer deleted do not come back on a restart). Order
/// numbers come from the `0003` trigger.
///
/// # Errors
/// When a statement fails (e.g. the schema is not applied, or a dealership
/// code or email is taken by a row with another id); nothing is kept then.
pub async fn seed(client: &mut Client) -> Result<(), DemoError> {
    let db = DemoError::db;
    let tx = client.transaction().await.map_err(db("begin the seed transaction"))?;
    tx.execute("select pg_advisory_xact_lock($1)", &[&SEED_LOCK_KEY]).await.map_err(db("take the seed lock"))?;
    for user in &USERS {
        let meta = json!({"full_name": user.full_name});
        tx.execute(
            "insert into auth.users (id, email, role, raw_user_meta_data) values ($1, $2, 'authenticated', $3) \
             on conflict do nothing",
            &[&user.id, &user.email, &meta],
        )
        .await
        .map_err(db("insert a demo user"))?;
        tx.execute(
            "insert into public.profiles (id, email, full_name) values ($1, $2, $3) on conflict do nothing",
            &[&user.id, &user.email, &user.full_name],
        )
        .await
        .map_err(db("insert a demo profile"))?;
    }
    for d in &DEALERSHIPS {
        let address = json!({"city": d.city, "country": "SE"});
        tx.execute(
            "insert into public.dealerships (id, name, code, address) values ($1, $2, $3, $4) on conflict do nothing",
            &[&d.id, &d.name, &d.code, &address],
        )
        .await
        .map_err(db("insert a demo dealership"))?;
    }
    for m in &MEMBERSHIPS {
        tx.execute(
            "insert into public.dealer_memberships (id, user_id, dealership_id, role) values ($1, $2, $3, $4) \
             on conflict do nothing",
            &[&m.id, &m.user_id, &m.dealership_id, &m.role],
        )
        .await
        .map_err(db("insert a demo membership"))?;
    }
    let ids = dealership_ids();
    let has_orders = tx
        .query_opt("select 1 from public.orders where dealership_id = any($1) limit 1", &[&ids])
        .await
        .map_err(db("count the demo orders"))?
        .is_some();
    if !has_orders {
        for o in &SEED_ORDERS {
            tx.execute(
                "insert into public.orders \
                     (id, dealership_id, type, status, customer_info, vehicle_info, created_by, created_at, updated_at) \
                 values ($1, $2, $3, $4, $5, $6, $7, now() - make_interval(mins => $8), \
                         now() - make_interval(mins => $8)) \
                 on conflict do nothing",
                &[
                    &o.id,
                    &o.dealership_id,
                    &o.kind,
                    &o.status,
                    &customer_info(o.customer),
                    &vehicle_info(o.vehicle),
                    &o.created_by,
                    &o.minutes_ago,
                ],
            )
            .await
            .map_err(db("insert a demo order"))?;
        }
    }
    tx.commit().await.map_err(db("commit the demo data"))?;
    tracing::info!(orders_added = !has_orders, "demo data loaded");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct() {
        let mut ids: Vec<Uuid> = DEALERSHIPS.iter().map(|d| d.id).collect();
        ids.extend(USERS.iter().map(|u| u.id));
        ids.extend(MEMBERSHIPS.iter().map(|m| m.id));
        ids.extend(SEED_ORDERS.iter().map(|o| o.id));
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n);
    }

    #[test]
    fn creators_are_members_of_their_dealership() {
        for d in &DEALERSHIPS {
            assert!(MEMBERSHIPS.iter().any(|m| m.dealership_id == d.id && m.user_id == d.creator), "{}", d.code);
        }
        for o in &SEED_ORDERS {
            assert!(MEMBERSHIPS.iter().any(|m| m.dealership_id == o.dealership_id && m.user_id == o.created_by));
        }
    }
}
