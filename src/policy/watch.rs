//! Following policy changes while walcast runs: how a change is noticed.
//!
//! Two signals, both acted on by the change stage (which re-reads the
//! catalog with [`super::plan::reload`] and hands the hub a
//! [`crate::hub::StageEvent::PolicyUpdate`]):
//!
//! - **Event trigger** (`sql/walcast/`, installed by `walcast setup`): DDL
//!   on policies, privileges, tables, functions and publications writes a
//!   transactional logical message with prefix [`MESSAGE_PREFIX`] inside its
//!   own transaction; the stage reloads at that transaction's commit, so
//!   the new plans judge every transaction committed after it (WAL order).
//!   Each message carries the trigger's count of policy DDL
//!   (`walcast.policy_epoch`, [`message_epoch`]); a reload that reads a
//!   higher count than the stream has shown read a catalog ahead of the
//!   stream, and the hub judges as in the catch-up window until a reload
//!   that is not.
//! - **Polling** ([`Fingerprints`]): role attributes and memberships
//!   (`pg_roles`, `pg_auth_members`) fire no event trigger, so a fingerprint
//!   of them is read every poll interval; without the trigger (not
//!   installed, disabled, or a server before 14 where pgoutput cannot send
//!   messages) a fingerprint of policies, privileges, tables, functions and
//!   publications is read as well. A difference triggers the same reload,
//!   up to one interval late.
//!
//! Every statement here runs under a `statement_timeout` of
//! [`STATEMENT_TIMEOUT`].

use std::fmt;
use std::time::Duration;

/// The prefix of the event trigger's messages.
pub const MESSAGE_PREFIX: &str = "walcast-policy";

/// The event trigger's name (`sql/walcast/0001_policy_changes.sql`).
pub const TRIGGER: &str = "walcast_policy_changes";

/// Default time between two polls.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(10);

/// Longest a poll's statement may run.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// How policy changes are noticed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// The event trigger reports DDL in WAL order; roles are polled.
    EventTrigger,
    /// No usable trigger: everything is polled (the reason why).
    Polling(String),
}

impl Mode {
    /// Whether the catalog (policies, privileges, functions) is polled too.
    pub fn polls_catalog(&self) -> bool {
        matches!(self, Mode::Polling(_))
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::EventTrigger => write!(
                f,
                "event trigger: policy, privilege and function changes apply from their commit on (WAL order); \
                 role attributes and memberships are polled"
            ),
            Mode::Polling(why) => write!(
                f,
                "polling ({why}): policy, privilege, function and role changes apply up to one poll interval late"
            ),
        }
    }
}

/// Which mode is in force on this database.
///
/// # Errors
/// SQL errors.
pub async fn mode(client: &tokio_postgres::Client) -> Result<Mode, tokio_postgres::Error> {
    let row = client
        .query_one(
            "select current_setting('server_version_num')::int, \
             (select evtenabled::text from pg_catalog.pg_event_trigger where evtname = $1)",
            &[&TRIGGER],
        )
        .await?;
    let (version, enabled): (i32, Option<String>) = (row.get(0), row.get(1));
    Ok(match enabled.as_deref() {
        _ if version < 140_000 => {
            Mode::Polling(format!("PostgreSQL {} cannot send logical messages through pgoutput", version / 10_000))
        }
        None => Mode::Polling("the walcast_policy_changes event trigger is not installed".into()),
        Some("D") => Mode::Polling("the walcast_policy_changes event trigger is disabled".into()),
        Some(_) => Mode::EventTrigger,
    })
}

/// Roles, their attributes and memberships.
const ROLES_SQL: &str = "
select md5(coalesce(string_agg(x, E'\\n' order by x), '')) from (
  select r::text as x from pg_catalog.pg_roles r
  union all
  select m::text from pg_catalog.pg_auth_members m
) s";

/// Policies, table flags and privileges, columns, functions, publications
/// (everything outside the system schemas).
const CATALOG_SQL: &str = "
select md5(coalesce(string_agg(x, E'\\n' order by x), '')) from (
  select concat_ws(' ', 'p', p.oid, p.polname, p.polrelid, p.polcmd, p.polpermissive, p.polroles::text,
                   pg_catalog.pg_get_expr(p.polqual, p.polrelid)) as x
  from pg_catalog.pg_policy p
  union all
  select concat_ws(' ', 'c', c.oid, c.relname, c.relnamespace, c.relowner, c.relacl::text, c.relrowsecurity,
                   c.relforcerowsecurity, c.relreplident)
  from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
  where c.relkind in ('r', 'p') and n.nspname not in ('pg_catalog', 'information_schema')
    and n.nspname !~ '^pg_toast'
  union all
  select concat_ws(' ', 'a', a.attrelid, a.attnum, a.attname, a.atttypid, a.attisdropped, a.attacl::text)
  from pg_catalog.pg_attribute a join pg_catalog.pg_class c on c.oid = a.attrelid
  join pg_catalog.pg_namespace n on n.oid = c.relnamespace
  where a.attnum > 0 and c.relkind in ('r', 'p') and n.nspname not in ('pg_catalog', 'information_schema')
    and n.nspname !~ '^pg_toast'
  union all
  select concat_ws(' ', 'f', f.oid, f.proname, f.pronamespace, f.proowner, f.prosecdef, f.provolatile,
                   f.proconfig::text, md5(f.prosrc), f.proacl::text)
  from pg_catalog.pg_proc f join pg_catalog.pg_namespace n on n.oid = f.pronamespace
  where n.nspname not in ('pg_catalog', 'information_schema')
  union all
  select concat_ws(' ', 'u', p.oid, p.pubname, p.puballtables) from pg_catalog.pg_publication p
  union all
  select concat_ws(' ', 'r', r.prpubid, r.prrelid) from pg_catalog.pg_publication_rel r
) s";

/// The last fingerprints read, to tell a change.
#[derive(Debug, Default, Clone)]
pub struct Fingerprints {
    roles: Option<String>,
    catalog: Option<String>,
}

impl Fingerprints {
    /// Reads the fingerprints (the catalog's only in `mode` polling) and
    /// returns whether any differs from the last read (the first read only
    /// records).
    ///
    /// # Errors
    /// SQL errors (a timeout included).
    pub async fn changed(
        &mut self,
        client: &tokio_postgres::Client,
        mode: &Mode,
    ) -> Result<bool, tokio_postgres::Error> {
        let roles: String = client.query_one(ROLES_SQL, &[]).await?.get(0);
        let catalog: Option<String> =
            if mode.polls_catalog() { Some(client.query_one(CATALOG_SQL, &[]).await?.get(0)) } else { None };
        let changed = self.roles.as_ref().is_some_and(|r| *r != roles)
            || (catalog.is_some() && self.catalog.is_some() && catalog != self.catalog);
        self.roles = Some(roles);
        // Leaving polling mode forgets the catalog's print; coming back
        // records a fresh one first.
        self.catalog = catalog;
        Ok(changed)
    }
}

/// The count of policy DDL a `walcast-policy` message carries (`epoch`).
pub fn message_epoch(content: &[u8]) -> Option<i64> {
    serde_json::from_slice::<serde_json::Value>(content).ok()?.get("epoch")?.as_i64()
}

/// What the poller tells the change stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Noticed {
    /// The first fingerprints were read: anything loaded before may have
    /// missed a change made before them (reload if something was loaded).
    First,
    /// A fingerprint changed, or the mode fell back to polling.
    Changed,
}

/// Polls every `interval` until `notices` closes: the mode, then the
/// fingerprints, each read under [`STATEMENT_TIMEOUT`] (the whole poll under
/// twice that); a failed poll is logged and the next one starts on a new
/// session. Runs as its own task, so a slow or unreachable database never
/// holds up the change stage. At most one notice waits (a full channel
/// already says "reload").
pub async fn poll(
    connection: crate::pgconn::PgConfig,
    interval: Duration,
    notices: tokio::sync::mpsc::Sender<Noticed>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<tokio_postgres::Client> = None;
    let mut prints = Fingerprints::default();
    let mut mode: Option<Mode> = None;
    let mut first = true;
    loop {
        tokio::select! {
            _ = notices.closed() => return,
            _ = tick.tick() => {}
        }
        let read = tokio::time::timeout(2 * STATEMENT_TIMEOUT, async {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = Some(connect(&connection).await?);
            }
            let c = client.as_ref().expect("connected above");
            let now = self::mode(c).await?;
            let changed = prints.changed(c, &now).await?;
            Ok::<_, super::PolicyError>((now, changed))
        })
        .await;
        let notice = match read {
            Ok(Ok((now, changed))) => {
                let mut notice = changed.then_some(Noticed::Changed);
                if mode.as_ref() != Some(&now) {
                    tracing::info!(mode = %now, "following policy changes");
                    // Leaving the trigger for polling: changes in between
                    // may have gone unnoticed.
                    if mode.is_some() && now.polls_catalog() {
                        notice = Some(Noticed::Changed);
                    }
                    mode = Some(now);
                }
                if first {
                    first = false;
                    notice = notice.or(Some(Noticed::First));
                }
                notice
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "polling roles and policies failed; retrying at the next poll");
                client = None;
                None
            }
            Err(_) => {
                tracing::warn!(
                    timeout_ms = (2 * STATEMENT_TIMEOUT).as_millis() as u64,
                    "polling roles and policies timed out; retrying at the next poll"
                );
                client = None;
                None
            }
        };
        if let Some(notice) = notice {
            if let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) = notices.try_send(notice) {
                return;
            }
        }
    }
}

/// Connects the poller's SQL session: `statement_timeout` set, so a poll
/// never hangs the change stage.
///
/// # Errors
/// Connection or SQL errors.
pub async fn connect(config: &crate::pgconn::PgConfig) -> Result<tokio_postgres::Client, super::PolicyError> {
    let client = crate::pgconn::connect(config).await?;
    client
        .batch_execute(&format!(
            "set statement_timeout = {}; set application_name = 'walcast policy watch'",
            STATEMENT_TIMEOUT.as_millis()
        ))
        .await?;
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_the_epoch() {
        assert_eq!(
            message_epoch(br#"{"event":"ddl_command_end","tag":"CREATE POLICY","epoch":7,"objects":[]}"#),
            Some(7)
        );
        assert_eq!(message_epoch(br#"{"epoch":null}"#), None);
        assert_eq!(message_epoch(b"marker"), None);
    }

    #[test]
    fn the_mode_says_what_is_polled() {
        assert!(!Mode::EventTrigger.polls_catalog());
        assert!(Mode::Polling("x".into()).polls_catalog());
        assert!(Mode::EventTrigger.to_string().contains("event trigger"));
        assert!(Mode::Polling("no trigger".into()).to_string().contains("no trigger"));
    }
}
