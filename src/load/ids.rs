//! Identifiers of the rows a load run creates, and its random numbers.
//!
//! Every row the run writes gets a UUID that encodes what it is and its index:
//! the high 64 bits are the run's random prefix with a 4-bit tag (dealership,
//! user, order, membership) in the low nibble, the low 64 bits the index. A
//! client can therefore tell from a delivered row alone which order or
//! membership it is — no shared lookup table on the receive path — and a row
//! of another run or another writer (a different prefix) is recognised as
//! foreign, which the checker counts as a leak.

use uuid::Uuid;

/// What a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Tag {
    /// `public.dealerships`.
    Dealership = 1,
    /// `auth.users` / `public.profiles`.
    User = 2,
    /// `public.orders`.
    Order = 3,
    /// `public.dealer_memberships`.
    Membership = 4,
}

/// The id scheme of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    /// Random; the low nibble is always 0 (the tag goes there).
    prefix: u64,
}

impl Ids {
    /// A scheme around `prefix` (its low nibble is ignored).
    pub fn new(prefix: u64) -> Ids {
        Ids { prefix: prefix & !0xF }
    }

    /// A scheme with a prefix from the operating system's random source.
    pub fn random() -> Ids {
        Ids::new(random_u64())
    }

    /// The UUID of row `index` of kind `tag`.
    pub fn uuid(&self, tag: Tag, index: u32) -> Uuid {
        Uuid::from_u64_pair(self.prefix | tag as u64, u64::from(index))
    }

    /// The index of a row of kind `tag` from its UUID text; `None` when the
    /// text is not a UUID of this run and kind (a foreign row).
    pub fn index(&self, tag: Tag, text: &str) -> Option<u32> {
        let (high, low) = Uuid::parse_str(text).ok()?.as_u64_pair();
        if high != self.prefix | tag as u64 {
            return None;
        }
        u32::try_from(low).ok()
    }

    /// A dealership code unique to this run (`[A-Z0-9]`, at most 17 characters).
    pub fn dealership_code(&self, index: u32) -> String {
        format!("L{:08X}{index}", (self.prefix >> 32) as u32)
    }

    /// A short hex form of the prefix, for names (databases, slots, emails).
    pub fn short(&self) -> String {
        format!("{:08x}", (self.prefix >> 32) as u32)
    }
}

/// 64 random bits from `/dev/urandom` (falling back to the clock and pid).
pub fn random_u64() -> u64 {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).is_ok() {
        return u64::from_le_bytes(bytes);
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    Rng::new(nanos ^ u64::from(std::process::id()).rotate_left(32)).next_u64()
}

/// A small seeded generator (SplitMix64): the same seed gives the same run.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is negligible here).
    pub fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % u64::from(n.max(1))) as u32
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_round_trip_and_foreign_rows_are_recognised() {
        let ids = Ids::new(0x1234_5678_9abc_def7);
        let other = Ids::new(0x1234_5678_9abc_dee0);
        let u = ids.uuid(Tag::Order, 42);
        assert_eq!(ids.index(Tag::Order, &u.to_string()), Some(42));
        assert_eq!(ids.index(Tag::Membership, &u.to_string()), None);
        assert_eq!(other.index(Tag::Order, &u.to_string()), None);
        assert_eq!(ids.index(Tag::Order, "not a uuid"), None);
        let code = ids.dealership_code(999_999);
        assert!(code.len() <= 20 && code.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()), "{code}");
    }

    #[test]
    fn rng_is_deterministic() {
        let (mut a, mut b) = (Rng::new(5), Rng::new(5));
        for _ in 0..100 {
            assert_eq!(a.below(7), b.below(7));
        }
        assert!((0..1000).map(|_| a.unit()).all(|x| (0.0..1.0).contains(&x)));
    }
}
