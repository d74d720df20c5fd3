//! Spill logs: order across the memory/disk boundary, independent cursors,
//! the disk budget, file removal, and a decoder that never panics.

use std::sync::Arc;

use bytes::{BufMut, Bytes};
use proptest::prelude::*;

use super::*;
use crate::change::{ColumnInfo, Datum, Op, Row};
use crate::pgoutput::ReplicaIdentity;

fn relation(oid: u32, columns: usize) -> Arc<RelationInfo> {
    Arc::new(RelationInfo {
        oid,
        schema: "public".into(),
        table: format!("t{oid}"),
        replica_identity: ReplicaIdentity::Full,
        columns: (0..columns)
            .map(|i| ColumnInfo {
                name: format!("c{i}"),
                type_name: "text".into(),
                type_oid: 25,
                is_key: i == 0,
                kind: crate::change::value::kind_of(25),
            })
            .collect(),
    })
}

fn change(rel: &Arc<RelationInfo>, i: usize) -> Change {
    let row = |v: usize| {
        Row(vec![Datum::Text(Bytes::from(format!("{v}"))), Datum::Null, Datum::Absent, Datum::Text(Bytes::new())])
    };
    Change {
        relation: Arc::clone(rel),
        op: [Op::Insert, Op::Update, Op::Delete][i % 3],
        record: (i % 3 != 2).then(|| row(i)),
        old_record: (i % 3 != 0).then(|| row(i + 1)),
        missing_toast: if i % 5 == 0 { vec!["c3".into()] } else { Vec::new() },
    }
}

fn spill(budget: u64) -> (tempfile::TempDir, Spill) {
    let dir = tempfile::tempdir().unwrap();
    let spill = Spill::new(SpillConfig { dir: dir.path().join("spill"), disk_budget: budget }).unwrap();
    (dir, spill)
}

fn read_all(log: &ChangeLog) -> Vec<(u32, Change)> {
    let mut cursor = Cursor::default();
    let mut out = Vec::new();
    while let Some((tag, change)) = log.read(&mut cursor).unwrap() {
        out.push((tag, change.into_owned()));
    }
    out
}

#[test]
fn changes_come_back_in_order_across_memory_and_disk_and_twice() {
    let (_dir, spill) = spill(DEFAULT_DISK_BUDGET);
    let a = relation(1, 4);
    let b = relation(2, 4);
    let mut log = spill.log(10 * change(&a, 1).byte_size());
    let mut expected = Vec::new();
    for i in 0..10_000 {
        let c = change(if i % 2 == 0 { &a } else { &b }, i);
        expected.push((i as u32, c.clone()));
        log.push(i as u32, c).unwrap();
    }
    assert!(log.spilled());
    assert_eq!(log.len(), 10_000);
    log.seal().unwrap();
    let first = read_all(&log);
    assert_eq!(first, expected);
    assert!(Arc::ptr_eq(&first[9_999].1.relation, &b), "relations are shared, not copied");
    assert_eq!(read_all(&log), expected, "a second cursor reads the same");
    assert_eq!(spill.stats().disk_bytes.load(Ordering::Relaxed), log.disk_size());
    let path = log.file.as_ref().unwrap().path.clone();
    assert!(path.exists());
    drop(log);
    assert!(!path.exists(), "a dropped log removes its file");
    assert_eq!(spill.stats().disk_bytes.load(Ordering::Relaxed), 0);
}

#[test]
fn discarding_a_tag_drops_exactly_its_changes_in_memory_and_on_disk() {
    let (_dir, spill) = spill(DEFAULT_DISK_BUDGET);
    let a = relation(1, 4);
    let mut log = spill.log(20 * change(&a, 1).byte_size());
    let mut expected = Vec::new();
    for i in 0..200 {
        let tag = (i % 4) as u32;
        log.push(tag, change(&a, i)).unwrap();
        if tag != 2 {
            expected.push((tag, change(&a, i)));
        }
    }
    log.discard(2);
    log.seal().unwrap();
    assert_eq!(read_all(&log), expected);
}

#[test]
fn a_small_log_never_touches_the_disk() {
    let (_dir, spill) = spill(DEFAULT_DISK_BUDGET);
    let a = relation(1, 4);
    let mut log = spill.log(1 << 20);
    for i in 0..100 {
        log.push(0, change(&a, i)).unwrap();
    }
    assert!(!log.spilled());
    log.seal().unwrap();
    assert_eq!(read_all(&log).len(), 100);
    let spilled = std::fs::read_dir(spill.dir())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "spill"))
        .count();
    assert_eq!(spilled, 0);
}

#[test]
fn the_disk_budget_hands_the_change_back_and_is_shared() {
    let a = relation(1, 4);
    let mut buf = BytesMut::new();
    codec::encode(0, 0, &change(&a, 1), &mut buf);
    let (_dir, spill) = spill(buf.len() as u64 * 3);
    let mut one = spill.log(0);
    let mut two = spill.log(0);
    one.push(0, change(&a, 1)).unwrap();
    one.push(0, change(&a, 1)).unwrap();
    two.push(0, change(&a, 1)).unwrap();
    let (err, back) = two.push(0, change(&a, 1)).unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert_eq!(back, Some(change(&a, 1)), "nothing is dropped");
    assert_eq!(spill.stats().budget_waits.load(Ordering::Relaxed), 1);
    drop(one);
    two.push(0, back.unwrap()).unwrap();
    two.seal().unwrap();
    assert_eq!(read_all(&two).len(), 2);
}

#[test]
fn a_directory_is_used_by_one_spill_at_a_time() {
    let (dir, spill) = spill(1 << 20);
    let again = Spill::new(SpillConfig { dir: spill.dir().to_owned(), disk_budget: 1 << 20 });
    assert!(matches!(again, Err(SpillError::InUse { .. })), "{again:?}");
    drop(spill);
    Spill::new(SpillConfig { dir: dir.path().join("spill"), disk_budget: 1 << 20 }).expect("free again");
}

#[test]
fn a_temporary_spill_removes_its_directory() {
    let spill = Spill::temporary();
    let dir = spill.dir().to_owned();
    assert!(dir.exists());
    drop(spill);
    assert!(!dir.exists());
}

#[test]
fn leftover_files_are_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let spill_dir = dir.path().join("spill");
    std::fs::create_dir_all(&spill_dir).unwrap();
    std::fs::write(spill_dir.join("123-0.spill"), b"old").unwrap();
    std::fs::write(spill_dir.join("keep.txt"), b"not ours").unwrap();
    let _spill = Spill::new(SpillConfig { dir: spill_dir.clone(), disk_budget: 1 << 20 }).unwrap();
    assert!(!spill_dir.join("123-0.spill").exists());
    assert!(spill_dir.join("keep.txt").exists());
}

#[test]
fn a_truncated_file_is_reported_as_corrupt() {
    let (_dir, spill) = spill(DEFAULT_DISK_BUDGET);
    let a = relation(1, 4);
    let mut log = spill.log(0);
    for i in 0..3 {
        log.push(0, change(&a, i)).unwrap();
    }
    log.seal().unwrap();
    let file = log.file.as_mut().unwrap();
    file.size -= 1;
    let mut cursor = Cursor::default();
    let mut result = Ok(None);
    for _ in 0..3 {
        result = log.read(&mut cursor).map(|c| c.map(|(t, _)| t));
        if result.is_err() {
            break;
        }
    }
    assert!(matches!(result, Err(SpillError::Corrupt { .. })), "{result:?}");
    log.file.as_mut().unwrap().size += 1;
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let relations = vec![relation(1, 4)];
        let mut record = BytesMut::new();
        record.put_slice(&((bytes.len() + 4) as u32).to_le_bytes());
        record.put_slice(&bytes);
        let _ = codec::decode(&record.freeze(), &relations);
    }

    #[test]
    fn encode_decode_round_trips(i in 0usize..1000, tag in any::<u32>()) {
        let relations = vec![relation(1, 4)];
        let c = change(&relations[0], i);
        let mut buf = BytesMut::new();
        codec::encode(tag, 0, &c, &mut buf);
        prop_assert_eq!(codec::frame_len(&buf), Some(buf.len()));
        prop_assert_eq!(codec::decode(&buf.freeze(), &relations), Some((tag, c)));
    }
}
