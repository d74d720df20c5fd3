//! Row Level Security exactly as PostgreSQL enforces it, acting as the API
//! roles with JWT claims of several users.

use std::collections::BTreeSet;

use tokio_postgres::Client;
use uuid::Uuid;

use crate::support::{
    add_member, create_dealership, create_order, create_user, execute_as, migrated_db, query_as, sqlstate, Who,
};
use walcast::cluster::ScratchDatabase;

/// Three dealerships, users with every role, and orders in several states.
struct World {
    _db: ScratchDatabase,
    client: Client,
    alpha: Uuid,
    bravo: Uuid,
    charlie: Uuid,
    /// admin of alpha
    admin_a: Uuid,
    /// manager of alpha
    manager_a: Uuid,
    /// user of alpha
    user_a: Uuid,
    /// user of bravo
    user_b: Uuid,
    /// user of alpha and admin of bravo
    multi: Uuid,
    /// no memberships
    outsider: Uuid,
    /// alpha, created by manager_a, pending
    order_a_manager: Uuid,
    /// alpha, created by user_a, draft
    order_a_user_draft: Uuid,
    /// alpha, created by user_a, pending
    order_a_user_pending: Uuid,
    /// alpha, created by admin_a, in progress
    order_a_admin: Uuid,
    /// bravo, created by user_b, draft
    order_b_user_draft: Uuid,
    /// charlie, written by the superuser in the outsider's name
    order_c: Uuid,
}

async fn world() -> World {
    let (db, client) = migrated_db().await;
    let alpha = create_dealership(&client, "ALPHA").await;
    let bravo = create_dealership(&client, "BRAVO").await;
    let charlie = create_dealership(&client, "CHARLIE").await;
    let admin_a = create_user(&client, "admin.a@example.com").await;
    let manager_a = create_user(&client, "manager.a@example.com").await;
    let user_a = create_user(&client, "user.a@example.com").await;
    let user_b = create_user(&client, "user.b@example.com").await;
    let multi = create_user(&client, "multi@example.com").await;
    let outsider = create_user(&client, "outsider@example.com").await;
    add_member(&client, admin_a, alpha, "admin").await;
    add_member(&client, manager_a, alpha, "manager").await;
    add_member(&client, user_a, alpha, "user").await;
    add_member(&client, user_b, bravo, "user").await;
    add_member(&client, multi, alpha, "user").await;
    add_member(&client, multi, bravo, "admin").await;
    let order_a_manager = create_order(&client, alpha, manager_a, "sales", "pending").await;
    let order_a_user_draft = create_order(&client, alpha, user_a, "service", "draft").await;
    let order_a_user_pending = create_order(&client, alpha, user_a, "service", "pending").await;
    let order_a_admin = create_order(&client, alpha, admin_a, "recon", "in_progress").await;
    let order_b_user_draft = create_order(&client, bravo, user_b, "carwash", "draft").await;
    let order_c = create_order(&client, charlie, outsider, "sales", "completed").await;
    World {
        _db: db,
        client,
        alpha,
        bravo,
        charlie,
        admin_a,
        manager_a,
        user_a,
        user_b,
        multi,
        outsider,
        order_a_manager,
        order_a_user_draft,
        order_a_user_pending,
        order_a_admin,
        order_b_user_draft,
        order_c,
    }
}

async fn ids_as(client: &mut Client, who: Who, sql: &str) -> BTreeSet<Uuid> {
    query_as(client, who, sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql} as {who:?}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn set(ids: &[Uuid]) -> BTreeSet<Uuid> {
    ids.iter().copied().collect()
}

#[tokio::test]
async fn members_see_exactly_their_dealerships_orders() {
    let mut w = world().await;
    let alpha_orders = set(&[w.order_a_manager, w.order_a_user_draft, w.order_a_user_pending, w.order_a_admin]);
    let sql = "select id from public.orders";
    for who in [w.admin_a, w.manager_a, w.user_a] {
        assert_eq!(ids_as(&mut w.client, Who::User(who), sql).await, alpha_orders);
    }
    assert_eq!(ids_as(&mut w.client, Who::User(w.user_b), sql).await, set(&[w.order_b_user_draft]));
    let mut multi = alpha_orders.clone();
    multi.insert(w.order_b_user_draft);
    assert_eq!(ids_as(&mut w.client, Who::User(w.multi), sql).await, multi);
    // Non-members, anon and a user id that does not exist see nothing.
    assert!(ids_as(&mut w.client, Who::User(w.outsider), sql).await.is_empty());
    assert!(ids_as(&mut w.client, Who::User(Uuid::new_v4()), sql).await.is_empty());
    assert!(ids_as(&mut w.client, Who::Anon, sql).await.is_empty());
    // service_role bypasses RLS.
    let mut all = multi;
    all.insert(w.order_c);
    assert_eq!(ids_as(&mut w.client, Who::Service, sql).await, all);
}

#[tokio::test]
async fn dealerships_memberships_and_profiles_follow_membership() {
    let mut w = world().await;
    let dealerships = "select id from public.dealerships";
    assert_eq!(ids_as(&mut w.client, Who::User(w.user_a), dealerships).await, set(&[w.alpha]));
    assert_eq!(ids_as(&mut w.client, Who::User(w.multi), dealerships).await, set(&[w.alpha, w.bravo]));
    assert!(ids_as(&mut w.client, Who::User(w.outsider), dealerships).await.is_empty());
    assert!(ids_as(&mut w.client, Who::Anon, dealerships).await.is_empty());
    assert_eq!(ids_as(&mut w.client, Who::Service, dealerships).await, set(&[w.alpha, w.bravo, w.charlie]));

    // Co-members' memberships of shared dealerships only.
    let members = "select user_id from public.dealer_memberships";
    assert_eq!(
        ids_as(&mut w.client, Who::User(w.user_a), members).await,
        set(&[w.admin_a, w.manager_a, w.user_a, w.multi])
    );
    assert_eq!(ids_as(&mut w.client, Who::User(w.user_b), members).await, set(&[w.user_b, w.multi]));
    let bravo_rows: i64 = query_as(
        &mut w.client,
        Who::User(w.user_a),
        "select count(*) from public.dealer_memberships where dealership_id = $1",
        &[&w.bravo],
    )
    .await
    .unwrap()[0]
        .get(0);
    assert_eq!(bravo_rows, 0, "user_a must not see bravo's memberships, even multi's");
    assert!(ids_as(&mut w.client, Who::User(w.outsider), members).await.is_empty());
    assert!(ids_as(&mut w.client, Who::Anon, members).await.is_empty());

    // Profiles: your own, and your co-members'.
    let profiles = "select id from public.profiles";
    assert_eq!(
        ids_as(&mut w.client, Who::User(w.user_a), profiles).await,
        set(&[w.admin_a, w.manager_a, w.user_a, w.multi])
    );
    assert_eq!(ids_as(&mut w.client, Who::User(w.outsider), profiles).await, set(&[w.outsider]));
    assert!(ids_as(&mut w.client, Who::Anon, profiles).await.is_empty());
}

#[tokio::test]
async fn profiles_are_writable_by_their_owner_only() {
    let mut w = world().await;
    let update = "update public.profiles set full_name = 'New Name' where id = $1";
    assert_eq!(execute_as(&mut w.client, Who::User(w.user_a), update, &[&w.user_a]).await.unwrap(), 1);
    // A co-member's profile is visible but read-only.
    assert_eq!(execute_as(&mut w.client, Who::User(w.user_a), update, &[&w.admin_a]).await.unwrap(), 0);
    // Nobody promotes themselves through profiles.role, nor changes their email.
    let err = execute_as(
        &mut w.client,
        Who::User(w.user_a),
        "update public.profiles set role = 'admin' where id = $1",
        &[&w.user_a],
    )
    .await
    .unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
    let err = execute_as(
        &mut w.client,
        Who::User(w.user_a),
        "update public.profiles set email = 'x@y.z' where id = $1",
        &[&w.user_a],
    )
    .await
    .unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
    assert!(execute_as(&mut w.client, Who::Anon, update, &[&w.user_a]).await.is_err());
}

const INSERT_ORDER: &str = "insert into public.orders (dealership_id, type, customer_info, created_by) \
                            values ($1, 'sales', '{\"name\": \"Grace Hopper\"}', $2)";

#[tokio::test]
async fn order_inserts_need_membership_and_self_as_creator() {
    let mut w = world().await;
    for who in [w.admin_a, w.manager_a, w.user_a, w.multi] {
        assert_eq!(
            execute_as(&mut w.client, Who::User(who), INSERT_ORDER, &[&w.alpha, &who]).await.unwrap(),
            1,
            "member {who} inserts into alpha"
        );
    }
    // Creating an order in someone else's name.
    let err = execute_as(&mut w.client, Who::User(w.user_a), INSERT_ORDER, &[&w.alpha, &w.admin_a]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
    // Into a dealership you are not a member of.
    let err = execute_as(&mut w.client, Who::User(w.user_a), INSERT_ORDER, &[&w.bravo, &w.user_a]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
    let err =
        execute_as(&mut w.client, Who::User(w.outsider), INSERT_ORDER, &[&w.charlie, &w.outsider]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
    let err = execute_as(&mut w.client, Who::Anon, INSERT_ORDER, &[&w.alpha, &w.user_a]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
    assert_eq!(execute_as(&mut w.client, Who::Service, INSERT_ORDER, &[&w.charlie, &w.outsider]).await.unwrap(), 1);
}

#[tokio::test]
async fn order_updates_follow_the_role_rules() {
    let mut w = world().await;
    let touch = "update public.orders set metadata = '{\"touched\": true}' where id = $1";
    let cases: Vec<(&str, Uuid, Uuid, u64)> = vec![
        // admin: any order of the dealership
        ("admin, manager's order", w.admin_a, w.order_a_manager, 1),
        ("admin, user's pending order", w.admin_a, w.order_a_user_pending, 1),
        ("admin of alpha, bravo order", w.admin_a, w.order_b_user_draft, 0),
        // manager: orders they created
        ("manager, own order", w.manager_a, w.order_a_manager, 1),
        ("manager, user's draft", w.manager_a, w.order_a_user_draft, 0),
        ("manager, admin's order", w.manager_a, w.order_a_admin, 0),
        // user: own orders in status draft
        ("user, own draft", w.user_a, w.order_a_user_draft, 1),
        ("user, own pending", w.user_a, w.order_a_user_pending, 0),
        ("user, manager's order", w.user_a, w.order_a_manager, 0),
        ("user of bravo, own draft", w.user_b, w.order_b_user_draft, 1),
        // multi: admin in bravo, user in alpha
        ("multi (admin of bravo), bravo order", w.multi, w.order_b_user_draft, 1),
        ("multi (user of alpha), user_a's draft", w.multi, w.order_a_user_draft, 0),
        ("outsider", w.outsider, w.order_c, 0),
    ];
    for (what, who, order, expected) in cases {
        let n =
            execute_as(&mut w.client, Who::User(who), touch, &[&order]).await.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(n, expected, "{what}");
    }
    assert_eq!(
        execute_as(&mut w.client, Who::Anon, touch, &[&w.order_a_manager]).await.ok(),
        None,
        "anon may not update"
    );
    assert_eq!(execute_as(&mut w.client, Who::Service, touch, &[&w.order_c]).await.unwrap(), 1);

    // A user may submit a draft, but not complete it.
    let status = "update public.orders set status = $2 where id = $1";
    assert_eq!(
        execute_as(&mut w.client, Who::User(w.user_a), status, &[&w.order_a_user_draft, &"pending"]).await.unwrap(),
        1
    );
    let err = execute_as(&mut w.client, Who::User(w.user_a), status, &[&w.order_a_user_draft, &"completed"])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
    // Nobody moves an order into a dealership where they lack the right.
    let moving = "update public.orders set dealership_id = $2 where id = $1";
    let err = execute_as(&mut w.client, Who::User(w.admin_a), moving, &[&w.order_a_admin, &w.bravo]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
    let err =
        execute_as(&mut w.client, Who::User(w.manager_a), moving, &[&w.order_a_manager, &w.bravo]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
    // A manager cannot hand their order to someone else's name.
    let err = execute_as(
        &mut w.client,
        Who::User(w.manager_a),
        "update public.orders set created_by = $2 where id = $1",
        &[&w.order_a_manager, &w.user_a],
    )
    .await
    .unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
}

#[tokio::test]
async fn only_admins_delete_orders() {
    let mut w = world().await;
    let delete = "delete from public.orders where id = $1";
    assert_eq!(execute_as(&mut w.client, Who::User(w.admin_a), delete, &[&w.order_a_user_pending]).await.unwrap(), 1);
    assert_eq!(execute_as(&mut w.client, Who::User(w.manager_a), delete, &[&w.order_a_manager]).await.unwrap(), 0);
    assert_eq!(execute_as(&mut w.client, Who::User(w.user_a), delete, &[&w.order_a_user_draft]).await.unwrap(), 0);
    assert_eq!(execute_as(&mut w.client, Who::User(w.admin_a), delete, &[&w.order_b_user_draft]).await.unwrap(), 0);
    assert_eq!(execute_as(&mut w.client, Who::User(w.multi), delete, &[&w.order_b_user_draft]).await.unwrap(), 1);
    assert!(execute_as(&mut w.client, Who::Anon, delete, &[&w.order_a_admin]).await.is_err());
}

#[tokio::test]
async fn dealership_admins_manage_memberships() {
    let mut w = world().await;
    let invite = "insert into public.dealer_memberships (user_id, dealership_id, role) values ($1, $2, 'user')";
    assert_eq!(execute_as(&mut w.client, Who::User(w.admin_a), invite, &[&w.outsider, &w.alpha]).await.unwrap(), 1);
    for who in [w.manager_a, w.user_a] {
        let err = execute_as(&mut w.client, Who::User(who), invite, &[&w.outsider, &w.alpha]).await.unwrap_err();
        assert_eq!(sqlstate(&err), "42501", "{err}");
    }
    // Admin of alpha cannot add members to bravo; nobody grants themselves a membership.
    let err = execute_as(&mut w.client, Who::User(w.admin_a), invite, &[&w.outsider, &w.bravo]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
    let err = execute_as(&mut w.client, Who::User(w.outsider), invite, &[&w.outsider, &w.charlie]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");

    let promote = "update public.dealer_memberships set role = 'admin' where user_id = $1 and dealership_id = $2";
    assert_eq!(execute_as(&mut w.client, Who::User(w.admin_a), promote, &[&w.user_a, &w.alpha]).await.unwrap(), 1);
    assert_eq!(execute_as(&mut w.client, Who::User(w.user_a), promote, &[&w.user_a, &w.alpha]).await.unwrap(), 0);
    assert_eq!(execute_as(&mut w.client, Who::User(w.manager_a), promote, &[&w.manager_a, &w.alpha]).await.unwrap(), 0);
    // Moving a membership into a dealership one does not administer.
    let err = execute_as(
        &mut w.client,
        Who::User(w.admin_a),
        "update public.dealer_memberships set dealership_id = $2 where user_id = $1 and dealership_id = $3",
        &[&w.user_a, &w.charlie, &w.alpha],
    )
    .await
    .unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");

    let remove = "delete from public.dealer_memberships where user_id = $1 and dealership_id = $2";
    assert_eq!(execute_as(&mut w.client, Who::User(w.admin_a), remove, &[&w.user_a, &w.alpha]).await.unwrap(), 1);
    assert_eq!(execute_as(&mut w.client, Who::User(w.manager_a), remove, &[&w.user_a, &w.alpha]).await.unwrap(), 0);
    assert_eq!(execute_as(&mut w.client, Who::User(w.multi), remove, &[&w.user_b, &w.bravo]).await.unwrap(), 1);
    assert!(execute_as(&mut w.client, Who::Anon, remove, &[&w.user_a, &w.alpha]).await.is_err());
}

#[tokio::test]
async fn a_revoked_membership_hides_the_dealership_at_once() {
    let mut w = world().await;
    let sql = "select id from public.orders";
    assert_eq!(ids_as(&mut w.client, Who::User(w.user_b), sql).await.len(), 1);
    w.client.execute("delete from public.dealer_memberships where user_id = $1", &[&w.user_b]).await.unwrap();
    assert!(ids_as(&mut w.client, Who::User(w.user_b), sql).await.is_empty());
}
