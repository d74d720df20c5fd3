//! Admission of WebSocket upgrades: the server's connection cap and the
//! socket budgets per user (`sub` of the upgrade's token) and per client
//! address, all taken *before* the `101 Switching Protocols` and held by the
//! session for its whole life.
//!
//! ```text
//!  upgrade (apikey verified) ──▶ Admission::admit(client address, sub)
//!     ├─ connection permit (Semaphore, max_connections)   else 429 "Too many connected users"
//!     ├─ address slot (count per IP, max_sockets_per_address) else 429 "too many sockets from this address …"
//!     └─ user slot (count per sub, max_sockets_per_user)   else 429 "too many sockets for this user …"
//!  ──▶ Ticket (dropped when the session ends: every count goes back)
//! ```
//!
//! Invariants:
//! - Each count is taken and checked in one step (a semaphore permit, or a
//!   map entry updated under its lock), so a burst of concurrent upgrades
//!   can never overshoot a limit; a refused upgrade holds nothing.
//! - A [`Ticket`] gives back exactly what it took when dropped, whatever way
//!   the session ends; an entry whose count reaches zero is removed, so the
//!   maps hold only users and addresses with open sockets.
//! - The client address is the TCP peer, unless the peer is a trusted proxy
//!   (`--trusted-proxies`): then it is the rightmost `X-Forwarded-For`
//!   address that is not itself trusted. A client cannot pick its address by
//!   sending the header to the server directly.
//! - Tokens without a `sub` (the anon and service keys) are not counted per
//!   user.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::realtime::users::{CountSlot, KeyedCounts, UserSlot, UserSockets};
use crate::realtime::{Limits, RealtimeStats};

/// An address block (`10.0.0.0/8`, `fd00::/8`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address (host bits cleared).
    network: IpAddr,
    /// Prefix length in bits.
    prefix: u8,
}

/// A CIDR that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an address block (expected e.g. 10.0.0.0/8, 192.168.1.7 or fd00::/8)")]
pub struct CidrError(String);

impl Cidr {
    /// Whether `ip` is in the block (IPv4-mapped IPv6 addresses count as
    /// IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => mask_v4(u32::from(ip), self.prefix) == u32::from(net),
            (IpAddr::V6(net), IpAddr::V6(ip)) => mask_v6(u128::from(ip), self.prefix) == u128::from(net),
            _ => false,
        }
    }

    /// Parses a comma-separated list (blanks ignored).
    ///
    /// # Errors
    /// The first entry that is not a CIDR.
    pub fn parse_list(text: &str) -> Result<Vec<Cidr>, CidrError> {
        text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(Cidr::from_str).collect()
    }
}

fn mask_v4(bits: u32, prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        bits & (u32::MAX << (32 - u32::from(prefix)))
    }
}

fn mask_v6(bits: u128, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        bits & (u128::MAX << (128 - u32::from(prefix)))
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        let err = || CidrError(text.to_owned());
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr = IpAddr::from_str(addr.trim()).map_err(|_| err())?.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(err)?,
            None => max,
        };
        let network = match addr {
            IpAddr::V4(a) => IpAddr::from(mask_v4(u32::from(a), prefix).to_be_bytes()),
            IpAddr::V6(a) => IpAddr::from(mask_v6(u128::from(a), prefix).to_be_bytes()),
        };
        Ok(Cidr { network, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Why an upgrade was refused (HTTP 429).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The server holds `max_connections` sockets.
    Connections,
    /// The client address holds `max_sockets_per_address` sockets.
    Address {
        /// The limit.
        limit: usize,
    },
    /// The token's `sub` holds `max_sockets_per_user` sockets.
    User {
        /// The limit.
        limit: usize,
    },
}

impl Refusal {
    /// The `error` text of the 429 body (Supabase's for the connection cap).
    pub fn message(&self) -> String {
        match self {
            Refusal::Connections => "Too many connected users".to_owned(),
            Refusal::Address { limit } => format!("too many sockets from this address (limit {limit})"),
            Refusal::User { limit } => format!("too many sockets for this user (limit {limit})"),
        }
    }
}

/// What an admitted socket holds for its life: its connection permit and
/// its user's and address's counts. Dropping it gives them back.
#[derive(Debug)]
pub struct Ticket {
    _connection: OwnedSemaphorePermit,
    _address: CountSlot<IpAddr>,
    _user: Option<UserSlot>,
}

/// The connection cap and the per-user and per-address budgets.
#[derive(Debug)]
pub struct Admission {
    /// One permit per socket.
    connections: Arc<Semaphore>,
    /// The semaphore's capacity.
    max_connections: usize,
    /// Sockets per client address.
    addresses: KeyedCounts<IpAddr>,
    /// Sockets per `sub`.
    users: UserSockets,
    /// Peers whose `X-Forwarded-For` is believed.
    trusted_proxies: Vec<Cidr>,
}

impl Admission {
    /// The budgets of `limits`; the per-user counts are `users`, which the
    /// sessions share (they count the users of their joins' tokens too).
    pub fn new(limits: &Limits, users: UserSockets) -> Admission {
        let max_connections = limits.max_connections.min(Semaphore::MAX_PERMITS);
        Admission {
            connections: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            addresses: KeyedCounts::new(limits.max_sockets_per_address),
            users,
            trusted_proxies: limits.trusted_proxies.clone(),
        }
    }

    /// The client's address: `peer`, or — when `peer` is a trusted proxy —
    /// the rightmost address of the `X-Forwarded-For` values (in order) that
    /// is not itself trusted. When every listed address is trusted, the
    /// leftmost; an entry that is not an address ends the walk at the last
    /// one that was.
    pub fn client_address<'a>(&self, peer: IpAddr, forwarded_for: impl DoubleEndedIterator<Item = &'a str>) -> IpAddr {
        let mut client = peer.to_canonical();
        if !self.is_trusted(client) {
            return client;
        }
        for value in forwarded_for.rev() {
            for entry in value.rsplit(',') {
                let Some(ip) = parse_forwarded(entry.trim()) else { return client };
                client = ip;
                if !self.is_trusted(ip) {
                    return ip;
                }
            }
        }
        client
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|cidr| cidr.contains(ip))
    }

    /// Takes the connection permit, then the address's and the user's
    /// counts; counts a refusal in `stats`.
    ///
    /// # Errors
    /// The first budget that is full (nothing is held then).
    pub fn admit(&self, address: IpAddr, sub: Option<&str>, stats: &RealtimeStats) -> Result<Ticket, Refusal> {
        let result = self.take(address, sub);
        if let Err(refusal) = &result {
            let counter = match refusal {
                Refusal::Connections => &stats.upgrades_refused_connections,
                Refusal::Address { .. } => &stats.upgrades_refused_address,
                Refusal::User { .. } => &stats.upgrades_refused_user,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn take(&self, address: IpAddr, sub: Option<&str>) -> Result<Ticket, Refusal> {
        let connection = Arc::clone(&self.connections).try_acquire_owned().map_err(|_| Refusal::Connections)?;
        let address = self.addresses.take(address).ok_or(Refusal::Address { limit: self.addresses.limit() })?;
        let user = match sub {
            Some(sub) => Some(self.users.take(sub.to_owned()).ok_or(Refusal::User { limit: self.users.limit() })?),
            None => None,
        };
        Ok(Ticket { _connection: connection, _address: address, _user: user })
    }

    /// Sockets admitted now (permits out).
    pub fn sockets(&self) -> usize {
        self.max_connections - self.connections.available_permits()
    }

    /// Sockets counted for `address` now.
    pub fn address_sockets(&self, address: IpAddr) -> usize {
        self.addresses.count(&address.to_canonical())
    }
}

/// An `X-Forwarded-For` entry: an address, possibly `[v6]:port` or
/// `v4:port` as some proxies write it.
fn parse_forwarded(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip().to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_address: usize, per_user: usize, max_connections: usize, trusted: &str) -> Limits {
        Limits {
            max_connections,
            max_sockets_per_address: per_address,
            max_sockets_per_user: per_user,
            trusted_proxies: Cidr::parse_list(trusted).unwrap(),
            ..Limits::default()
        }
    }

    #[test]
    fn cidrs_parse_and_match() {
        let net: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(net.to_string(), "10.0.0.0/8");
        assert!(net.contains("10.200.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.0.0.9".parse().unwrap()), "IPv4-mapped");
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        let one: Cidr = "192.168.1.7".parse().unwrap();
        assert!(one.contains("192.168.1.7".parse().unwrap()));
        assert!(!one.contains("192.168.1.8".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!(!all.contains("::1".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        let any6: Cidr = "::/0".parse().unwrap();
        assert!(any6.contains("2001:db8::1".parse().unwrap()));
        for bad in ["", "10.0.0.0/33", "::/129", "10.0.0/8", "x", "10.0.0.0/-1"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(Cidr::parse_list(" 10.0.0.0/8 , ,127.0.0.1").unwrap().len(), 2);
        assert!(Cidr::parse_list("10.0.0.0/8,nope").is_err());
    }

    #[test]
    fn forwarded_for_is_read_only_from_trusted_peers() {
        let a = Admission::new(&limits(10, 10, 10, "10.0.0.0/8, 127.0.0.1"), UserSockets::new(10));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // An untrusted peer: the header is ignored.
        assert_eq!(a.client_address(ip("203.0.113.5"), ["1.2.3.4"].into_iter()), ip("203.0.113.5"));
        // A trusted peer: the rightmost untrusted entry.
        assert_eq!(a.client_address(ip("10.0.0.1"), ["6.6.6.6, 1.2.3.4, 10.0.0.2"].into_iter()), ip("1.2.3.4"));
        // Several header lines read as one list.
        assert_eq!(a.client_address(ip("127.0.0.1"), ["6.6.6.6", "1.2.3.4:5678"].into_iter()), ip("1.2.3.4"));
        assert_eq!(a.client_address(ip("127.0.0.1"), ["[2001:db8::7]:443"].into_iter()), ip("2001:db8::7"));
        // No header: the proxy itself.
        assert_eq!(a.client_address(ip("10.0.0.1"), std::iter::empty()), ip("10.0.0.1"));
        // Garbage ends the walk at the last address read.
        assert_eq!(a.client_address(ip("10.0.0.1"), ["nonsense, 10.0.0.3"].into_iter()), ip("10.0.0.3"));
        // Every entry trusted: the leftmost.
        assert_eq!(a.client_address(ip("10.0.0.1"), ["10.0.0.9, 10.0.0.3"].into_iter()), ip("10.0.0.9"));
        // IPv4-mapped peers count as IPv4.
        assert_eq!(a.client_address(ip("::ffff:10.0.0.1"), ["1.2.3.4"].into_iter()), ip("1.2.3.4"));
    }

    #[test]
    fn budgets_are_taken_and_given_back() {
        let a = Admission::new(&limits(2, 1, 3, ""), UserSockets::new(1));
        let stats = RealtimeStats::default();
        let (x, y, z) = ("1.1.1.1".parse().unwrap(), "2.2.2.2".parse().unwrap(), "3.3.3.3".parse().unwrap());
        let first = a.admit(x, Some("alice"), &stats).unwrap();
        assert_eq!(a.admit(x, Some("alice"), &stats).unwrap_err(), Refusal::User { limit: 1 });
        let second = a.admit(x, None, &stats).unwrap();
        assert_eq!(a.admit(x, None, &stats).unwrap_err(), Refusal::Address { limit: 2 });
        let third = a.admit(y, Some("bob"), &stats).unwrap();
        assert_eq!(a.admit(z, None, &stats).unwrap_err(), Refusal::Connections);
        assert_eq!(stats.upgrades_refused_user.load(Ordering::Relaxed), 1);
        assert_eq!(stats.upgrades_refused_address.load(Ordering::Relaxed), 1);
        assert_eq!(stats.upgrades_refused_connections.load(Ordering::Relaxed), 1);
        assert_eq!(a.address_sockets(x), 2);
        assert_eq!(a.sockets(), 3);
        drop((first, second, third));
        assert_eq!(a.address_sockets(x), 0);
        assert_eq!(a.sockets(), 0);
        assert_eq!(a.addresses.count(&x), 0, "no count outlives its sockets");
        assert_eq!(a.users.count(&"alice".to_owned()), 0);
        let again = a.admit(x, Some("alice"), &stats).unwrap();
        assert_eq!(Refusal::User { limit: 100 }.message(), "too many sockets for this user (limit 100)");
        drop(again);
    }
}
