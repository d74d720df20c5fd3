//! Property tests for the pgoutput decoder and encoder as a pair.
//!
//! `decode(encode(m)) == m` over generated messages of every kind, in and
//! out of stream blocks, and "never panics" over arbitrary and mutated bytes.

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;

use super::decode::decode_message;
use super::*;
use crate::lsn::Lsn;

fn lsn() -> impl Strategy<Value = Lsn> {
    any::<u64>().prop_map(Lsn)
}

fn ts() -> impl Strategy<Value = PgTimestamp> {
    any::<i64>().prop_map(PgTimestamp)
}

/// Deterministic pseudo-random bytes from a seed (splitmix64). Generating
/// one `u64` instead of a value tree per byte keeps 20,000-case runs fast.
fn seeded(seed: u64, len: usize) -> impl Iterator<Item = u64> {
    let mut state = seed;
    (0..len).map(move |_| {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

/// Strings as PostgreSQL sends them: any UTF-8 without NUL, mixing ASCII
/// with 2-, 3- and 4-byte characters.
fn name() -> impl Strategy<Value = String> {
    (any::<u64>(), 0..12usize).prop_map(|(seed, len)| {
        seeded(seed, len)
            .map(|r| {
                let code = match r % 4 {
                    0 | 1 => 1 + (r >> 8) % 0x7F,
                    2 => 0x80 + (r >> 8) % 0x780,
                    _ => (r >> 8) % 0x11_0000,
                };
                char::from_u32(u32::try_from(code).unwrap_or(0x41)).filter(|&c| c != '\0').unwrap_or('?')
            })
            .collect()
    })
}

fn payload() -> impl Strategy<Value = Bytes> {
    (any::<u64>(), 0..24usize).prop_map(|(seed, len)| seeded(seed, len).map(|r| r.to_le_bytes()[0]).collect())
}

// Variants are picked with a number rather than `prop_oneof!`, which clones
// the test runner for every arm on every case (see `one_of`).
fn value() -> impl Strategy<Value = TupleValue> {
    (0..4u8, payload()).prop_map(|(kind, bytes)| match kind {
        0 => TupleValue::Null,
        1 => TupleValue::UnchangedToast,
        2 => TupleValue::Text(bytes),
        _ => TupleValue::Binary(bytes),
    })
}

fn tuple() -> impl Strategy<Value = TupleData> {
    vec(value(), 0..8).prop_map(|columns| TupleData { columns })
}

fn old_tuple() -> impl Strategy<Value = OldTuple> {
    (any::<bool>(), tuple()).prop_map(|(key, t)| if key { OldTuple::Key(t) } else { OldTuple::Full(t) })
}

fn replica_identity() -> impl Strategy<Value = ReplicaIdentity> {
    proptest::sample::select(
        &[ReplicaIdentity::Default, ReplicaIdentity::Nothing, ReplicaIdentity::Full, ReplicaIdentity::Index][..],
    )
}

fn column() -> impl Strategy<Value = Column> {
    (any::<u8>(), name(), any::<u32>(), any::<i32>()).prop_map(|(flags, name, type_oid, type_modifier)| Column {
        flags,
        name,
        type_oid,
        type_modifier,
    })
}

fn prepare() -> impl Strategy<Value = Prepare> {
    (any::<u8>(), lsn(), lsn(), ts(), any::<u32>(), name()).prop_map(
        |(flags, prepare_lsn, end_lsn, prepare_timestamp, xid, gid)| Prepare {
            flags,
            prepare_lsn,
            end_lsn,
            prepare_timestamp,
            xid,
            gid,
        },
    )
}

/// Picks one arm by index and builds only its value tree.
///
/// `prop_oneof!` clones the test runner for every arm on every case, which
/// made generation dominate the 20,000-case runs; a flat map clones it once.
fn one_of<T: std::fmt::Debug + 'static>(arms: Vec<BoxedStrategy<T>>) -> impl Strategy<Value = T> {
    (0..arms.len()).prop_flat_map(move |i| arms[i].clone())
}

/// One strategy per message kind; `xid` fields are `Some` exactly when
/// `in_stream`.
fn message_arms(in_stream: bool) -> Vec<BoxedStrategy<Message>> {
    let xid = move || any::<u32>().prop_map(move |x| if in_stream { Some(x) } else { None });
    vec![
        (lsn(), ts(), any::<u32>())
            .prop_map(|(final_lsn, commit_timestamp, xid)| Message::Begin(Begin { final_lsn, commit_timestamp, xid }))
            .boxed(),
        (any::<u8>(), lsn(), lsn(), ts())
            .prop_map(|(flags, commit_lsn, end_lsn, t)| {
                Message::Commit(Commit { flags, commit_lsn, end_lsn, commit_timestamp: t })
            })
            .boxed(),
        (lsn(), name()).prop_map(|(commit_lsn, name)| Message::Origin(Origin { commit_lsn, name })).boxed(),
        (xid(), any::<u32>(), name(), name(), replica_identity(), vec(column(), 0..6))
            .prop_map(|(xid, oid, namespace, name, replica_identity, columns)| {
                Message::Relation(Relation { xid, oid, namespace, name, replica_identity, columns })
            })
            .boxed(),
        (xid(), any::<u32>(), name(), name())
            .prop_map(|(xid, oid, namespace, name)| Message::Type(Type { xid, oid, namespace, name }))
            .boxed(),
        (xid(), any::<u32>(), tuple())
            .prop_map(|(xid, relation_oid, new)| Message::Insert(Insert { xid, relation_oid, new }))
            .boxed(),
        (xid(), any::<u32>(), 0..3u8, tuple(), tuple())
            .prop_map(|(xid, relation_oid, old_kind, old, new)| {
                let old = match old_kind {
                    0 => None,
                    1 => Some(OldTuple::Key(old)),
                    _ => Some(OldTuple::Full(old)),
                };
                Message::Update(Update { xid, relation_oid, old, new })
            })
            .boxed(),
        (xid(), any::<u32>(), old_tuple())
            .prop_map(|(xid, relation_oid, old)| Message::Delete(Delete { xid, relation_oid, old }))
            .boxed(),
        (xid(), any::<u8>(), vec(any::<u32>(), 0..6))
            .prop_map(|(xid, options, relation_oids)| Message::Truncate(Truncate { xid, options, relation_oids }))
            .boxed(),
        (xid(), any::<u8>(), lsn(), name(), payload())
            .prop_map(|(xid, flags, lsn, prefix, content)| {
                Message::LogicalMessage(LogicalMessage { xid, flags, lsn, prefix, content })
            })
            .boxed(),
        (any::<u32>(), any::<bool>())
            .prop_map(|(xid, first_segment)| Message::StreamStart(StreamStart { xid, first_segment }))
            .boxed(),
        Just(Message::StreamStop).boxed(),
        (any::<u32>(), any::<u8>(), lsn(), lsn(), ts())
            .prop_map(|(xid, flags, commit_lsn, end_lsn, commit_timestamp)| {
                Message::StreamCommit(StreamCommit { xid, flags, commit_lsn, end_lsn, commit_timestamp })
            })
            .boxed(),
        (any::<u32>(), any::<u32>(), any::<bool>(), lsn(), ts())
            .prop_map(|(xid, subxid, parallel, abort_lsn, abort_timestamp)| {
                let abort = parallel.then_some(StreamAbortInfo { abort_lsn, abort_timestamp });
                Message::StreamAbort(StreamAbort { xid, subxid, abort })
            })
            .boxed(),
        (lsn(), lsn(), ts(), any::<u32>(), name())
            .prop_map(|(prepare_lsn, end_lsn, prepare_timestamp, xid, gid)| {
                Message::BeginPrepare(BeginPrepare { prepare_lsn, end_lsn, prepare_timestamp, xid, gid })
            })
            .boxed(),
        prepare().prop_map(Message::Prepare).boxed(),
        prepare().prop_map(Message::StreamPrepare).boxed(),
        (any::<u8>(), lsn(), lsn(), ts(), any::<u32>(), name())
            .prop_map(|(flags, commit_lsn, end_lsn, commit_timestamp, xid, gid)| {
                Message::CommitPrepared(CommitPrepared { flags, commit_lsn, end_lsn, commit_timestamp, xid, gid })
            })
            .boxed(),
        (any::<u8>(), lsn(), lsn(), ts(), ts(), any::<u32>(), name())
            .prop_map(|(flags, prepare_end_lsn, rollback_end_lsn, pts, rts, xid, gid)| {
                Message::RollbackPrepared(RollbackPrepared {
                    flags,
                    prepare_end_lsn,
                    rollback_end_lsn,
                    prepare_timestamp: pts,
                    rollback_timestamp: rts,
                    xid,
                    gid,
                })
            })
            .boxed(),
    ]
}

/// Any message of any kind, with the in-stream flag it must be encoded and
/// decoded with.
fn message_any_state() -> impl Strategy<Value = (Message, bool)> {
    let arms = [false, true]
        .into_iter()
        .flat_map(|in_stream| {
            message_arms(in_stream).into_iter().map(move |arm| arm.prop_map(move |m| (m, in_stream)).boxed())
        })
        .collect();
    one_of(arms)
}

/// A simple edit of a valid encoding.
#[derive(Clone, Debug)]
enum Mutation {
    Flip { at: usize, xor: u8 },
    Set { at: usize, byte: u8 },
    Truncate { at: usize },
    Insert { at: usize, byte: u8 },
    Remove { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (0..5u8, any::<usize>(), any::<u8>()).prop_map(|(kind, at, byte)| match kind {
        0 => Mutation::Flip { at, xor: byte.max(1) },
        1 => Mutation::Set { at, byte },
        2 => Mutation::Truncate { at },
        3 => Mutation::Insert { at, byte },
        _ => Mutation::Remove { at },
    })
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len().max(1);
    match *m {
        Mutation::Flip { at, xor } => {
            if let Some(b) = bytes.get_mut(at % len) {
                *b ^= xor;
            }
        }
        Mutation::Set { at, byte } => {
            if let Some(b) = bytes.get_mut(at % len) {
                *b = byte;
            }
        }
        Mutation::Truncate { at } => bytes.truncate(at % len),
        Mutation::Insert { at, byte } => bytes.insert(at % (bytes.len() + 1), byte),
        Mutation::Remove { at } => {
            if !bytes.is_empty() {
                bytes.remove(at % len);
            }
        }
    }
}

/// If arbitrary bytes decode, the result must be a fixed point of
/// encode-then-decode (it cannot always reproduce the input bytes, e.g. a
/// `first_segment` byte of 2).
fn check_no_panic(bytes: &[u8]) {
    let bytes = Bytes::copy_from_slice(bytes);
    for in_stream in [false, true] {
        if let Ok(msg) = decode_message(&bytes, in_stream) {
            let again = Bytes::from(encode(&msg, in_stream));
            assert_eq!(decode_message(&again, in_stream), Ok(msg));
        }
    }
    let mut decoder = Decoder::new();
    let _ = decoder.decode(&bytes);
}

/// Arbitrary bytes that mostly start with a real tag, so the fuzz gets past
/// the first byte.
fn raw_input() -> impl Strategy<Value = Vec<u8>> {
    (any::<bool>(), proptest::sample::select(&b"BCORYIUDTMSEcAbPKrp"[..]), vec(any::<u8>(), 0..48)).prop_map(
        |(raw, tag, mut bytes)| {
            if !raw {
                bytes.insert(0, tag);
            }
            bytes
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn round_trip((msg, in_stream) in message_any_state()) {
        let wire = Bytes::from(encode(&msg, in_stream));
        prop_assert_eq!(wire.first().copied(), Some(msg.tag()));
        prop_assert_eq!(decode_message(&wire, in_stream), Ok(msg.clone()));
        if !in_stream {
            prop_assert_eq!(decode(&wire), Ok(msg.clone()));
        }

        // `encode_into` appends and agrees with `encode`.
        let mut buf = vec![1, 2, 3];
        encode_into(&msg, in_stream, &mut buf);
        prop_assert_eq!(&buf[..3], &[1, 2, 3]);
        prop_assert_eq!(&buf[3..], &wire[..]);

        // Every strict prefix fails, except the one short Stream Abort that
        // is itself complete (the parallel fields are optional).
        for len in 0..wire.len() {
            let prefix = wire.slice(..len);
            let result = decode_message(&prefix, in_stream);
            let short_abort = matches!(&msg, Message::StreamAbort(a) if a.abort.is_some())
                && len == 9;
            prop_assert_eq!(result.is_ok(), short_abort, "prefix {} decoded: {:?}", len, result);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in raw_input()) {
        check_no_panic(&bytes);
    }

    #[test]
    fn mutated_messages_never_panic(
        (msg, in_stream) in message_any_state(),
        mutations in vec(mutation(), 1..4),
    ) {
        let mut bytes = encode(&msg, in_stream);
        for m in &mutations {
            apply(&mut bytes, m);
        }
        check_no_panic(&bytes);
    }
}

#[test]
fn decoder_over_an_encoded_streamed_transaction() {
    // S, R, I, E, S, U, E, c as PostgreSQL streams a large transaction.
    let stream = [
        (Message::StreamStart(StreamStart { xid: 9, first_segment: true }), false),
        (
            Message::Relation(Relation {
                xid: Some(9),
                oid: 1,
                namespace: "public".into(),
                name: "t".into(),
                replica_identity: ReplicaIdentity::Default,
                columns: vec![Column { flags: 1, name: "id".into(), type_oid: 23, type_modifier: -1 }],
            }),
            true,
        ),
        (
            Message::Insert(Insert {
                xid: Some(9),
                relation_oid: 1,
                new: TupleData { columns: vec![TupleValue::Text(Bytes::from_static(b"1"))] },
            }),
            true,
        ),
        (Message::StreamStop, true),
        (Message::StreamStart(StreamStart { xid: 9, first_segment: false }), false),
        (
            Message::Update(Update {
                xid: Some(9),
                relation_oid: 1,
                old: None,
                new: TupleData { columns: vec![TupleValue::Text(Bytes::from_static(b"2"))] },
            }),
            true,
        ),
        (Message::StreamStop, true),
        (
            Message::StreamCommit(StreamCommit {
                xid: 9,
                flags: 0,
                commit_lsn: Lsn(10),
                end_lsn: Lsn(20),
                commit_timestamp: PgTimestamp(0),
            }),
            false,
        ),
    ];
    let mut decoder = Decoder::new();
    for (msg, in_stream) in stream {
        assert_eq!(decoder.in_stream(), in_stream, "{msg:?}");
        let wire = Bytes::from(encode(&msg, in_stream));
        assert_eq!(decoder.decode(&wire), Ok(msg));
    }
    assert!(!decoder.in_stream());
}

#[test]
fn timestamp_conversion() {
    assert_eq!(PgTimestamp(0).unix_micros(), 946_684_800_000_000);
    assert_eq!(PgTimestamp(-946_684_800_000_000).unix_micros(), 0);
    assert_eq!(PgTimestamp(i64::MAX).unix_micros(), i64::MAX);
}
