//! Filter tests: operators × types (each case also checked under `not.`), changes, syntax, errors, properties.

use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::change::value::ValueKind;
use crate::change::ColumnInfo;
use crate::pgoutput::ReplicaIdentity;

fn relation(columns: &[(&str, &str)]) -> RelationInfo {
    RelationInfo {
        oid: 16_384,
        schema: "public".into(),
        table: "t".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: columns
            .iter()
            .enumerate()
            .map(|(i, (name, type_name))| ColumnInfo {
                name: (*name).into(),
                type_name: (*type_name).into(),
                type_oid: 0,
                is_key: i == 0,
                kind: ValueKind::Text,
            })
            .collect(),
    }
}

fn text(value: &str) -> Datum {
    Datum::Text(Bytes::copy_from_slice(value.as_bytes()))
}

fn datum(value: Option<&str>) -> Datum {
    value.map_or(Datum::Null, text)
}

/// `c=<spec>` on a one-column table of type `type_name` whose row holds `value` (`None`: NULL).
fn eval(type_name: &str, value: Option<&str>, spec: &str) -> bool {
    let rel = relation(&[("c", type_name)]);
    let filter =
        Filter::for_relation(&format!("c={spec}"), &rel).unwrap_or_else(|e| panic!("c={spec} on {type_name}: {e}"));
    filter.matches_row(&rel, &Row(vec![datum(value)]))
}

const U: &str = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
const T: &str = "2026-11-25 10:00:00.123456+00";
/// More digits than an `f64` holds.
const BIG: &str = "123456789012345678901234567890.000000000000000000001";

/// `(type, row value, operator.value, expected)`.
#[rustfmt::skip]
const CASES: &[(&str, Option<&str>, &str, bool)] = &[
    // integers
    ("int4", Some("5"), "eq.5", true),
    ("int4", Some("5"), "eq.6", false),
    ("int4", Some("5"), "eq.+05", true),
    ("int4", Some("5"), "eq. 5 ", true),
    ("int4", Some("5"), "neq.5", false),
    ("int4", Some("5"), "neq.6", true),
    ("int4", Some("5"), "lt.6", true),
    ("int4", Some("5"), "lt.5", false),
    ("int4", Some("5"), "lte.5", true),
    ("int4", Some("5"), "lte.4", false),
    ("int4", Some("5"), "gt.4", true),
    ("int4", Some("5"), "gt.5", false),
    ("int4", Some("5"), "gte.5", true),
    ("int4", Some("5"), "gte.6", false),
    ("int4", Some("-10"), "lt.-9", true),
    ("int4", Some("-10"), "gt.9", false),
    ("int4", Some("5"), "in.(1,5,9)", true),
    ("int4", Some("5"), "in.( 1 , 9 )", false),
    ("int4", Some("5"), "in.()", false),
    ("int4", Some("5"), "is.null", false),
    ("int4", Some("5"), "isdistinct.5", false),
    ("int4", Some("5"), "isdistinct.6", true),
    ("int4", Some("-2147483648"), "lt.-2147483647", true),
    ("int4", None, "eq.5", false),
    ("int4", None, "neq.5", false),
    ("int4", None, "lt.5", false),
    ("int4", None, "gte.5", false),
    ("int4", None, "in.(5)", false),
    ("int4", None, "is.null", true),
    ("int4", None, "isdistinct.5", true),
    ("int2", Some("32767"), "eq.32767", true),
    ("int2", Some("-32768"), "lt.32767", true),
    ("int2", Some("7"), "neq.7", false),
    ("int2", Some("7"), "lte.7", true),
    ("int2", Some("7"), "gt.-7", true),
    ("int2", Some("7"), "gte.8", false),
    ("int2", Some("7"), "in.(6,7)", true),
    ("int2", Some("7"), "isdistinct.7", false),
    ("int2", Some("7"), "is.null", false),
    ("int8", Some("9223372036854775807"), "gt.9223372036854775806", true),
    ("int8", Some("-9223372036854775808"), "eq.-9223372036854775808", true),
    ("int8", Some("9007199254740993"), "eq.9007199254740992", false),
    ("int8", Some("9007199254740993"), "gt.9007199254740992", true),
    ("int8", Some("42"), "neq.42", false),
    ("int8", Some("42"), "lt.-42", false),
    ("int8", Some("42"), "lte.42", true),
    ("int8", Some("42"), "gte.9223372036854775807", false),
    ("int8", Some("42"), "in.(9223372036854775807,42)", true),
    ("int8", Some("42"), "isdistinct.43", true),
    ("int8", Some("42"), "is.null", false),
    ("int8", None, "is.null", true),
    // floats
    ("float8", Some("1.5"), "eq.1.5", true),
    ("float8", Some("1.5"), "eq.1.50", true),
    ("float8", Some("1.5"), "eq.15e-1", true),
    ("float8", Some("1.5"), "lt.2", true),
    ("float8", Some("1.5"), "gt.1e0", true),
    ("float8", Some("0.1"), "eq.0.1", true),
    ("float8", Some("0.30000000000000004"), "gt.0.3", true),
    ("float8", Some("NaN"), "eq.NaN", true),
    ("float8", Some("NaN"), "eq.nan", true),
    ("float8", Some("NaN"), "gt.Infinity", true),
    ("float8", Some("Infinity"), "lt.NaN", true),
    ("float8", Some("Infinity"), "eq.infinity", true),
    ("float8", Some("-Infinity"), "lt.-1e308", true),
    ("float8", Some("-0"), "eq.0", true),
    ("float8", Some("1e+300"), "gt.1e299", true),
    ("float8", Some("1.5e-07"), "eq.0.00000015", true),
    ("float8", Some("1.5"), "in.(1, 1.5)", true),
    ("float8", Some("1.5"), "isdistinct.1.5", false),
    ("float8", Some("1.5"), "neq.1.5", false),
    ("float8", Some("NaN"), "neq.NaN", false),
    ("float8", Some("1.5"), "lte.1.4999999999999999", true),
    ("float8", Some("1.5"), "lte.1.49999999999999", false),
    ("float8", Some("1.5"), "gte.1.5", true),
    ("float8", Some("1.5"), "is.null", false),
    ("float8", None, "lt.1", false),
    ("float8", None, "is.null", true),
    ("float4", Some("0.1"), "eq.0.1", true),
    ("float4", Some("0.1"), "lt.0.1000001", true),
    ("float4", Some("3.4028235e+38"), "eq.3.4028235e38", true),
    ("float4", Some("NaN"), "gte.Infinity", true),
    ("float4", Some("1.5"), "in.(2,NaN)", false),
    ("float4", Some("1.5"), "neq.1.5", false),
    ("float4", Some("1.5"), "lte.1.5", true),
    ("float4", Some("1.5"), "gt.-Infinity", true),
    ("float4", Some("NaN"), "isdistinct.NaN", false),
    ("float4", Some("1.5"), "is.null", false),
    // numeric
    ("numeric", Some("1.50"), "eq.1.5", true),
    ("numeric", Some("1.50"), "neq.1.500001", true),
    ("numeric", Some("0.1"), "eq.1e-1", true),
    ("numeric", Some("100"), "eq.1E2", true),
    ("numeric", Some(BIG), "gt.123456789012345678901234567890", true),
    ("numeric", Some(BIG), "eq.123456789012345678901234567890", false),
    ("numeric", Some(BIG), "lt.123456789012345678901234567890.00000000000000000001", true),
    ("numeric", Some("-5"), "lt.-4.9999999999999999999", true),
    ("numeric", Some("-5"), "gt.-5.0000000000000000001", true),
    ("numeric", Some("0"), "eq.-0.000", true),
    ("numeric", Some("NaN"), "gt.Infinity", true),
    ("numeric", Some("NaN"), "eq.NaN", true),
    ("numeric", Some("Infinity"), "gt.1e100000", true),
    ("numeric", Some("Infinity"), "lt.NaN", true),
    ("numeric", Some("-Infinity"), "lt.-1e100000", true),
    ("numeric", Some("2.5"), "in.(1, 2.50)", true),
    ("numeric", Some("2.5"), "in.(1, 2.51)", false),
    ("numeric", Some("2.5"), "isdistinct.2.500", false),
    ("numeric", Some("2.5"), "lte.2.5", true),
    ("numeric", Some("2.5"), "gte.2.6", false),
    ("numeric", Some("2.5"), "is.null", false),
    ("numeric", None, "eq.1", false),
    ("numeric", None, "isdistinct.1", true),
    // text
    ("text", Some("hello"), "eq.hello", true),
    ("text", Some("hello"), "eq.Hello", false),
    ("text", Some("hello"), "neq.Hello", true),
    ("text", Some("B"), "lt.a", true),
    ("text", Some("abc"), "gt.ab", true),
    ("text", Some("abc"), "gte.abc", true),
    ("text", Some("abc"), "lte.abb", false),
    ("text", Some("é"), "gt.z", true),
    ("text", Some(""), "eq.", true),
    ("text", Some("a,b"), "eq.\"a,b\"", true),
    ("text", Some("v1.2.3"), "eq.v1.2.3", true),
    ("text", Some("f(x,y)"), "eq.f(x,y)", true),
    ("text", Some("say \"hi\""), "eq.\"say \\\"hi\\\"\"", true),
    ("text", Some("back\\slash"), "eq.\"back\\\\slash\"", true),
    ("text", Some(" padded "), "eq.\" padded \"", true),
    ("text", Some(" padded "), "eq. padded ", false),
    ("text", Some("hello"), "in.(x,hello)", true),
    ("text", Some("a,b"), "in.(\"a,b\",c)", true),
    ("text", Some("a"), "in.(\"a,b\",c)", false),
    ("text", Some("hello"), "like.he%", true),
    ("text", Some("hello"), "like.h_llo", true),
    ("text", Some("hello"), "like.h_lo", false),
    ("text", Some("hello"), "like.H%", false),
    ("text", Some("hello"), "like.%ll%", true),
    ("text", Some("hello"), "like.%%%", true),
    ("text", Some("hello"), "like.hell", false),
    ("text", Some("hello"), "ilike.H%", true),
    ("text", Some("hello"), "ilike.HELLO", true),
    ("text", Some("hello"), "ilike.HELL", false),
    ("text", Some("100%"), "like.100\\%", true),
    ("text", Some("1000"), "like.100\\%", false),
    ("text", Some("a_b"), "like.a\\_b", true),
    ("text", Some("axb"), "like.a\\_b", false),
    ("text", Some("a+b(c)"), "like.a+b(c)", true),
    ("text", Some("[x]"), "like.[x]", true),
    ("text", Some("x"), "like.[x]", false),
    ("text", Some("line1\nline2"), "like.line1%line2", true),
    ("text", Some("line1\nline2"), "like.line1_line2", true),
    ("text", Some("日本語"), "like.日_語", true),
    ("text", Some("ÉCOLE"), "ilike.école", true),
    ("text", Some("hello"), "match.^h.*o$", true),
    ("text", Some("hello"), "match.ell", true),
    ("text", Some("hello"), "match.^ell", false),
    ("text", Some("hello"), "match.HEL", false),
    ("text", Some("hello"), "imatch.HEL", true),
    ("text", Some("a\nb"), "match.a.b", true),
    ("text", Some("abc123"), "match.[0-9]{3}$", true),
    ("text", Some("hello"), "is.null", false),
    ("text", Some("hello"), "isdistinct.hello", false),
    ("text", Some("hello"), "isdistinct.x", true),
    ("text", None, "eq.hello", false),
    ("text", None, "like.%", false),
    ("text", None, "match.", false),
    ("text", None, "in.(hello)", false),
    ("text", None, "is.null", true),
    ("text", None, "isdistinct.hello", true),
    ("varchar", Some("abc"), "eq.abc", true),
    ("varchar", Some("abc"), "lt.abd", true),
    ("varchar", Some("abc"), "like.a%", true),
    ("varchar", Some("abc"), "neq.abc", false),
    ("varchar", Some("abc"), "lte.ab", false),
    ("varchar", Some("abc"), "gt.ABC", true),
    ("varchar", Some("abc"), "gte.abc", true),
    ("varchar", Some("abc"), "in.(abc)", true),
    ("varchar", Some("abc"), "ilike.A_C", true),
    ("varchar", Some("abc"), "match.b", true),
    ("varchar", Some("abc"), "imatch.^B", false),
    ("varchar", Some("abc"), "isdistinct.abc", false),
    ("varchar", Some("abc"), "is.null", false),
    ("name", Some("abc"), "gte.abc", true),
    ("name", Some("abc"), "ilike.A%", true),
    ("name", Some("abc"), "eq.abc", true),
    ("name", Some("abc"), "neq.abc", false),
    ("name", Some("abc"), "lt.abd", true),
    ("name", Some("abc"), "lte.abb", false),
    ("name", Some("abc"), "gt.Z", true),
    ("name", Some("abc"), "in.(x,y)", false),
    ("name", Some("abc"), "like.%c", true),
    ("name", Some("abc"), "match.^a", true),
    ("name", Some("abc"), "imatch.C$", true),
    ("name", Some("abc"), "isdistinct.abc", false),
    ("name", Some("abc"), "is.null", false),
    ("bpchar", Some("ab   "), "eq.ab", true),
    ("bpchar", Some("ab   "), "eq.\"ab \"", true),
    ("bpchar", Some("ab   "), "lt.abc", true),
    ("bpchar", Some("ab   "), "in.(x,ab)", true),
    ("bpchar", Some("ab   "), "like.ab", false),
    ("bpchar", Some("ab   "), "like.ab%", true),
    ("bpchar", Some("ab   "), "neq.ab", false),
    ("bpchar", Some("ab   "), "lte.ab", true),
    ("bpchar", Some("ab   "), "gt.aa", true),
    ("bpchar", Some("ab   "), "gte.abc", false),
    ("bpchar", Some("ab   "), "ilike.AB%", true),
    ("bpchar", Some("ab   "), "match.^ab   $", true),
    ("bpchar", Some("ab   "), "imatch.^AB$", false),
    ("bpchar", Some("ab   "), "isdistinct.ab", false),
    ("bpchar", Some("ab   "), "is.null", false),
    ("citext", Some("Hello"), "eq.hELLO", true),
    ("citext", Some("Hello"), "neq.hELLO", false),
    ("citext", Some("B"), "gt.a", true),
    ("citext", Some("Hello"), "like.h%", true),
    ("citext", Some("Hello"), "match.^HE", true),
    ("citext", Some("Hello"), "in.(x,HELLO)", true),
    ("citext", Some("Hello"), "lt.HELLP", true),
    ("citext", Some("Hello"), "lte.HELLO", true),
    ("citext", Some("Hello"), "gte.i", false),
    ("citext", Some("Hello"), "ilike.%LL%", true),
    ("citext", Some("Hello"), "imatch.^h", true),
    ("citext", Some("Hello"), "isdistinct.HELLO", false),
    ("citext", Some("Hello"), "is.null", false),
    // uuid
    ("uuid", Some(U), "eq.a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", true),
    ("uuid", Some(U), "eq.A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", true),
    ("uuid", Some(U), "eq.{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", true),
    ("uuid", Some(U), "eq.a0eebc999c0b4ef8bb6d6bb9bd380a11", true),
    ("uuid", Some(U), "eq.00000000-0000-0000-0000-000000000000", false),
    ("uuid", Some(U), "neq.00000000-0000-0000-0000-000000000000", true),
    ("uuid", Some(U), "lt.ffffffff-ffff-ffff-ffff-ffffffffffff", true),
    ("uuid", Some(U), "gt.a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a10", true),
    ("uuid", Some(U), "gte.A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", true),
    ("uuid", Some(U), "lt.0aeebc99-9c0b-4ef8-bb6d-6bb9bd380a11", false),
    ("uuid", Some(U), "lte.a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", true),
    ("uuid", Some(U), "is.null", false),
    ("uuid", Some(U), "in.(00000000-0000-0000-0000-000000000000,A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11)", true),
    ("uuid", Some(U), "isdistinct.A0EEBC999C0B4EF8BB6D6BB9BD380A11", false),
    ("uuid", None, "eq.a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", false),
    ("uuid", None, "is.null", true),
    // bool
    ("bool", Some("t"), "eq.true", true),
    ("bool", Some("t"), "eq.t", true),
    ("bool", Some("t"), "eq.YES", true),
    ("bool", Some("t"), "eq.on", true),
    ("bool", Some("t"), "eq.1", true),
    ("bool", Some("t"), "eq.false", false),
    ("bool", Some("f"), "eq.off", true),
    ("bool", Some("f"), "eq.0", true),
    ("bool", Some("f"), "lt.true", true),
    ("bool", Some("t"), "gt.f", true),
    ("bool", Some("t"), "neq.f", true),
    ("bool", Some("t"), "lte.f", false),
    ("bool", Some("f"), "gte.f", true),
    ("bool", Some("t"), "is.true", true),
    ("bool", Some("t"), "is.TRUE", true),
    ("bool", Some("t"), "is.false", false),
    ("bool", Some("f"), "is.false", true),
    ("bool", Some("t"), "is.unknown", false),
    ("bool", Some("t"), "is.null", false),
    ("bool", Some("f"), "in.(t)", false),
    ("bool", Some("t"), "isdistinct.true", false),
    ("bool", None, "eq.true", false),
    ("bool", None, "is.true", false),
    ("bool", None, "is.false", false),
    ("bool", None, "is.unknown", true),
    ("bool", None, "is.null", true),
    ("bool", None, "isdistinct.true", true),
    // date
    ("date", Some("2026-11-25"), "eq.2026-11-25", true),
    ("date", Some("2026-11-25"), "eq.2026-11-24", false),
    ("date", Some("2026-11-25"), "lt.2026-11-26", true),
    ("date", Some("2026-11-25"), "gt.2026-11-24", true),
    ("date", Some("2026-11-25"), "lt.2026-12-01", true),
    ("date", Some("2026-11-25"), "lt.infinity", true),
    ("date", Some("infinity"), "gt.9999-12-31", true),
    ("date", Some("infinity"), "eq.Infinity", true),
    ("date", Some("-infinity"), "lt.0001-01-01", true),
    ("date", Some("0044-03-15 BC"), "lt.0001-01-01", true),
    ("date", Some("2026-11-25"), "in.(2026-01-01,2026-11-25)", true),
    ("date", Some("2026-11-25"), "isdistinct.2026-11-25", false),
    ("date", Some("2026-11-25"), "neq.2026-11-25", false),
    ("date", Some("2026-11-25"), "lte.2026-11-25", true),
    ("date", Some("2026-11-25"), "gte.2026-11-26", false),
    ("date", Some("2026-11-25"), "is.null", false),
    ("date", None, "lt.2026-11-26", false),
    // timestamptz
    ("timestamptz", Some(T), "eq.2026-11-25T10:00:00.123456Z", true),
    ("timestamptz", Some(T), "eq.2026-11-25 10:00:00.123456", true),
    ("timestamptz", Some(T), "eq.2026-11-25T15:30:00.123456+05:30", true),
    ("timestamptz", Some(T), "eq.2026-11-25T02:00:00.123456-0800", true),
    ("timestamptz", Some(T), "eq.2026-11-25T10:00:00Z", false),
    ("timestamptz", Some(T), "gt.2026-11-25T10:00:00Z", true),
    ("timestamptz", Some(T), "lt.2026-11-25T10:00:00.123457Z", true),
    ("timestamptz", Some(T), "lte.2026-11-25T10:00:00.123456+00", true),
    ("timestamptz", Some(T), "gte.2026-11-25T10:00:00.123457+00", false),
    ("timestamptz", Some(T), "gt.-infinity", true),
    ("timestamptz", Some(T), "gte.2026-11-25", true),
    ("timestamptz", Some(T), "in.(2026-11-25T10:00:00Z,2026-11-25T10:00:00.123456Z)", true),
    ("timestamptz", Some("2026-11-25 10:00:00+00"), "eq.2026-11-25T10:00:00", true),
    ("timestamptz", Some(T), "neq.2026-11-25T11:00:00.123456+01", false),
    ("timestamptz", Some(T), "isdistinct.2026-11-25T10:00:00.123456Z", false),
    ("timestamptz", Some(T), "is.null", false),
    ("timestamptz", Some("infinity"), "gt.294276-01-01T00:00:00Z", true),
    ("timestamptz", Some("0044-03-15 12:00:00+00 BC"), "lt.0001-01-01T00:00:00Z", true),
    ("timestamptz", None, "gt.-infinity", false),
    ("timestamptz", None, "is.null", true),
    // timestamp
    ("timestamp", Some("2026-11-25 10:00:00.5"), "eq.2026-11-25T10:00:00.5", true),
    ("timestamp", Some("2026-11-25 10:00:00.5"), "lt.2026-11-25T10:00:01", true),
    ("timestamp", Some("2026-11-25 10:00:00"), "eq.2026-11-25 10:00:00+05", true),
    ("timestamp", Some("2026-11-25 10:00:00"), "gt.2026-11-25", true),
    ("timestamp", Some("infinity"), "gt.2026-11-25", true),
    ("timestamp", Some("2026-11-25 10:00:00"), "neq.2026-11-25T10:00:00", false),
    ("timestamp", Some("2026-11-25 10:00:00"), "lte.2026-11-25T09:59:59.999999", false),
    ("timestamp", Some("2026-11-25 10:00:00"), "gte.2026-11-25T10:00:00", true),
    ("timestamp", Some("2026-11-25 10:00:00"), "in.(2026-11-25T10:00:00,infinity)", true),
    ("timestamp", Some("2026-11-25 10:00:00"), "isdistinct.2026-11-25 10:00:00.000001", true),
    ("timestamp", Some("2026-11-25 10:00:00"), "is.null", false),
    ("timestamp", None, "eq.2026-11-25", false),
    // types compared by their text
    ("jsonb", Some("{\"a\": 1}"), "eq.{\"a\": 1}", true),
    ("jsonb", Some("{\"a\": 1}"), "eq.{\"a\":1}", false),
    ("jsonb", Some("{\"a\": 1, \"b\": 2}"), "eq.\"{\\\"a\\\": 1, \\\"b\\\": 2}\"", true),
    ("jsonb", Some("{\"a\": 1}"), "neq.{}", true),
    ("jsonb", Some("{\"a\": 1}"), "isdistinct.{\"a\": 1}", false),
    ("jsonb", Some("{\"a\": 1}"), "in.({},\"{\\\"a\\\": 1}\")", true),
    ("jsonb", Some("{\"a\": 1}"), "is.null", false),
    ("jsonb", None, "eq.{}", false),
    ("jsonb", None, "is.null", true),
    ("_int4", Some("{1,2}"), "eq.\"{1,2}\"", true),
    ("_int4", Some("{1,2}"), "in.(\"{1,2}\",\"{3}\")", true),
    ("_int4", Some("{1,2}"), "neq.{3}", true),
    ("_int4", Some("{1,2}"), "isdistinct.\"{1,2}\"", false),
    ("_int4", Some("{1,2}"), "is.null", false),
    ("mood", Some("happy"), "eq.happy", true),
    ("mood", Some("happy"), "in.(sad,ok)", false),
    ("mood", Some("happy"), "isdistinct.sad", true),
    ("mood", Some("happy"), "neq.happy", false),
    ("mood", Some("happy"), "is.null", false),
    ("interval", Some("1 day"), "eq.1 day", true),
    ("interval", Some("1 day"), "eq.24:00:00", false),
];

/// The expected result of `not.<spec>`.
fn negated(value: Option<&str>, spec: &str, expected: bool) -> bool {
    let two_valued = spec.starts_with("is.") || spec.starts_with("isdistinct.");
    if value.is_none() && !two_valued {
        false
    } else {
        !expected
    }
}

/// The expected result of `<spec>` on NULL: only `is.null`, `is.unknown` and `isdistinct` hold.
fn on_null(spec: &str) -> bool {
    let spec = spec.to_ascii_lowercase();
    spec == "is.null" || spec == "is.unknown" || spec.starts_with("isdistinct.")
}

#[test]
fn operators_by_type() {
    for &(type_name, value, spec, expected) in CASES {
        assert_eq!(eval(type_name, value, spec), expected, "c={spec} on {type_name} {value:?}");
        let not = negated(value, spec, expected);
        assert_eq!(eval(type_name, value, &format!("not.{spec}")), not, "c=not.{spec} on {type_name} {value:?}");
        // Every case once more on NULL, plain and under `not.`.
        let null = on_null(spec);
        assert_eq!(eval(type_name, None, spec), null, "c={spec} on {type_name} NULL");
        let not_null = negated(None, spec, null);
        assert_eq!(eval(type_name, None, &format!("not.{spec}")), not_null, "c=not.{spec} on {type_name} NULL");
    }
}

/// Every operator on every listed type either has cases above (each also run on NULL) or is rejected.
#[test]
fn operator_type_matrix_is_covered() {
    const OPS: [&str; 13] =
        ["eq", "neq", "lt", "lte", "gt", "gte", "in", "like", "ilike", "match", "imatch", "is", "isdistinct"];
    let mut missing = Vec::new();
    for type_name in [
        "int2",
        "int4",
        "int8",
        "float4",
        "float8",
        "numeric",
        "text",
        "varchar",
        "bpchar",
        "name",
        "citext",
        "uuid",
        "bool",
        "date",
        "timestamptz",
        "timestamp",
        "jsonb",
        "_int4",
        "mood",
    ] {
        let rel = relation(&[("c", type_name)]);
        for op in OPS {
            let cases: Vec<_> =
                CASES.iter().filter(|case| case.0 == type_name && case.2.split('.').next() == Some(op)).collect();
            let spec = match op {
                "in" => "c=in.(x)".to_owned(),
                "is" => "c=is.null".to_owned(),
                _ => format!("c={op}.x"),
            };
            let rejected = matches!(
                Filter::for_relation(&spec, &rel),
                Err(FilterError::UnsupportedOperator { .. } | FilterError::IsNeedsBool { .. })
            );
            if rejected {
                assert!(cases.is_empty(), "{op} on {type_name} has cases but is rejected");
            } else if !cases.iter().any(|case| case.1.is_some()) {
                missing.push(format!("{type_name} {op}"));
            }
        }
    }
    assert!(missing.is_empty(), "operators without cases:\n{}", missing.join("\n"));
}

#[test]
fn filters_can_be_shared_between_threads() {
    fn shared<T: Send + Sync + Clone + 'static>() {}
    shared::<Filter>();
    shared::<FilterError>();
}

#[test]
fn type_name_aliases() {
    assert!(eval("integer", Some("5"), "gt.4"));
    assert!(eval("character varying", Some("b"), "gt.a"));
    assert!(eval("timestamp with time zone", Some(T), "gt.2026-01-01"));
    assert!(eval("boolean", Some("t"), "is.true"));
}

// ---------------------------------------------------------------------------------------------------------------
// Changes
// ---------------------------------------------------------------------------------------------------------------

fn table() -> Arc<RelationInfo> {
    Arc::new(relation(&[("id", "int8"), ("status", "text"), ("body", "text"), ("done", "bool")]))
}

fn row(id: &str, status: Datum, body: Datum, done: Datum) -> Row {
    Row(vec![text(id), status, body, done])
}

fn change(op: Op, record: Option<Row>, old_record: Option<Row>) -> Change {
    Change { relation: table(), op, record, old_record, missing_toast: Vec::new() }
}

fn filter(spec: &str) -> Filter {
    Filter::for_relation(spec, &table()).unwrap_or_else(|e| panic!("{spec}: {e}"))
}

#[test]
fn insert_and_update_are_judged_on_the_new_row() {
    let open = row("1", text("open"), text("x"), text("f"));
    let closed = row("1", text("closed"), text("x"), text("t"));
    let insert = change(Op::Insert, Some(open.clone()), None);
    assert!(filter("status=eq.open").matches(&insert));
    assert!(!filter("status=eq.closed").matches(&insert));

    // The row moves out of the `open` view: not delivered to it.
    let update = change(Op::Update, Some(closed.clone()), Some(open.clone()));
    assert!(!filter("status=eq.open").matches(&update));
    assert!(filter("status=eq.closed").matches(&update));
    assert!(filter("done=is.true").matches(&update));
    // A change without the row it is judged on.
    assert!(!filter("status=eq.open").matches(&change(Op::Insert, None, None)));
}

#[test]
fn delete_is_judged_on_the_old_row() {
    let full = row("7", text("open"), text("x"), text("f"));
    let delete = change(Op::Delete, None, Some(full));
    assert!(filter("status=eq.open").matches(&delete));
    assert!(filter("id=eq.7").matches(&delete));
    assert!(!filter("id=eq.8").matches(&delete));

    // Default replica identity: only the key is known; other columns are absent and never match.
    let key_only = change(Op::Delete, None, Some(row("7", Datum::Absent, Datum::Absent, Datum::Absent)));
    assert!(filter("id=eq.7").matches(&key_only));
    for spec in ["status=eq.open", "status=not.eq.open", "status=is.null", "status=not.is.null", "status=isdistinct.x"]
    {
        assert!(!filter(spec).matches(&key_only), "{spec}");
    }
    assert!(!filter("id=eq.7,status=eq.open").matches(&key_only));
}

#[test]
fn absent_toast_value_fails_every_operator() {
    let update = change(Op::Update, Some(row("1", text("open"), Datum::Absent, text("t"))), None);
    for spec in [
        "body=eq.x",
        "body=neq.x",
        "body=not.eq.x",
        "body=is.null",
        "body=not.is.null",
        "body=isdistinct.x",
        "body=not.isdistinct.x",
        "body=like.%",
        "body=in.(x)",
    ] {
        assert!(!filter(spec).matches(&update), "{spec}");
    }
    assert!(filter("status=eq.open").matches(&update));
}

#[test]
fn truncate_passes_only_an_empty_filter() {
    let truncate = change(Op::Truncate, None, None);
    assert!(!filter("status=eq.open").matches(&truncate));
    assert!(!filter("status=is.null").matches(&truncate));
    assert!(filter("").matches(&truncate));
}

#[test]
fn empty_filter_matches_everything() {
    for spec in ["", "   ", "\t\n"] {
        let f = filter(spec);
        assert!(f.is_empty());
        assert_eq!(f.columns().count(), 0);
        assert!(f.matches(&change(Op::Delete, None, None)));
        assert!(f.matches(&change(Op::Insert, Some(row("1", Datum::Null, Datum::Null, Datum::Null)), None)));
    }
}

#[test]
fn column_missing_from_the_relation_fails() {
    let f = filter("body=eq.x");
    // The column was dropped after the subscription was made.
    let narrower = Arc::new(relation(&[("id", "int8"), ("status", "text")]));
    let c = Change {
        relation: narrower,
        op: Op::Insert,
        record: Some(Row(vec![text("1"), text("open")])),
        old_record: None,
        missing_toast: Vec::new(),
    };
    assert!(!f.matches(&c));
    assert!(!filter("body=is.null").matches(&c));
    // A row shorter than its relation.
    assert!(!f.matches_row(&table(), &Row(vec![text("1")])));
}

#[test]
fn conditions_are_and_ed() {
    let r = row("9", text("open"), text("hi, there"), Datum::Null);
    let rel = table();
    let yes = |spec: &str| Filter::for_relation(spec, &rel).unwrap().matches_row(&rel, &r);
    assert!(yes("status=eq.open,id=gt.5"));
    assert!(yes("status=eq.open, id=gt.5 , done=is.null"));
    assert!(!yes("status=eq.open,id=gt.9"));
    assert!(!yes("id=gt.9,status=eq.open"));
    assert!(yes("body=eq.\"hi, there\",status=in.(open,\"a,b\")"));
    assert!(yes("status=not.in.(draft,archived),id=lte.9"));
    assert!(!yes("status=not.in.(draft,open)"));
    assert!(yes("id=gt.1,id=lt.10"));
    assert!(!yes("id=gt.1,id=lt.9"));
    // Old servers read this as one value; here it is two conditions.
    assert!(yes("id=eq.9,status=eq.open"));
}

#[test]
fn columns_are_listed_once() {
    let f = filter("status=eq.a,id=gt.1,status=neq.b");
    assert_eq!(f.columns().collect::<Vec<_>>(), ["status", "id"]);
    assert!(!f.is_empty());
}

#[test]
fn parse_asks_for_each_column_type() {
    let seen = std::cell::RefCell::new(Vec::new());
    let f = Filter::parse("a=eq.1,b=like.x%", |name| {
        seen.borrow_mut().push(name.to_owned());
        match name {
            "a" => Some("int4"),
            "b" => Some("text"),
            _ => None,
        }
    })
    .unwrap();
    assert_eq!(*seen.borrow(), ["a", "b"]);
    assert_eq!(f.columns().collect::<Vec<_>>(), ["a", "b"]);
}

// ---------------------------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------------------------

fn error_table() -> RelationInfo {
    relation(&[
        ("t", "text"),
        ("i", "int4"),
        ("s", "int2"),
        ("f", "float8"),
        ("n", "numeric"),
        ("u", "uuid"),
        ("b", "bool"),
        ("d", "date"),
        ("ts", "timestamptz"),
        ("j", "jsonb"),
    ])
}

fn error(spec: &str) -> FilterError {
    match Filter::for_relation(spec, &error_table()) {
        Ok(f) => panic!("{spec} parsed: {f:?}"),
        Err(e) => e,
    }
}

fn s(text: &str) -> String {
    text.to_owned()
}

fn invalid_value(column: &str, type_name: &str, value: &str, reason: &str) -> FilterError {
    FilterError::InvalidValue { column: s(column), type_name: s(type_name), value: s(value), reason: s(reason) }
}

fn bad_list(column: &str, reason: &str) -> FilterError {
    FilterError::InvalidInList { column: s(column), reason: s(reason) }
}

fn unsupported(op: &str, column: &str, type_name: &str) -> FilterError {
    FilterError::UnsupportedOperator { op: s(op), column: s(column), type_name: s(type_name) }
}

#[test]
fn errors() {
    let hundred_and_one = format!("i=in.({})", (0..101).map(|i| i.to_string()).collect::<Vec<_>>().join(","));
    let hundred = format!("i=in.({})", (0..100).map(|i| i.to_string()).collect::<Vec<_>>().join(","));
    assert!(Filter::for_relation(&hundred, &error_table()).is_ok());
    let cases: Vec<(&str, FilterError)> = vec![
        ("t=eq.1,", FilterError::EmptyCondition),
        (",t=eq.1", FilterError::EmptyCondition),
        ("t=eq.1,,i=eq.2", FilterError::EmptyCondition),
        ("t=eq.1, ,i=eq.2", FilterError::EmptyCondition),
        ("t", FilterError::MissingEquals { condition: s("t") }),
        ("t=eq.1,i", FilterError::MissingEquals { condition: s("i") }),
        ("t,i=eq.1", FilterError::MissingEquals { condition: s("t") }),
        ("=eq.1", FilterError::MissingColumn { condition: s("=eq.1") }),
        ("t=eq", FilterError::MissingDot { condition: s("t=eq"), column: s("t") }),
        ("t=not.eq", FilterError::MissingDot { condition: s("t=not.eq"), column: s("t") }),
        ("t=eq,i=eq.1", FilterError::MissingDot { condition: s("t=eq"), column: s("t") }),
        ("t=like2.x", FilterError::UnknownOperator { op: s("like2"), column: s("t") }),
        ("t=EQ.x", FilterError::UnknownOperator { op: s("EQ"), column: s("t") }),
        ("t=not.not.eq.x", FilterError::UnknownOperator { op: s("not"), column: s("t") }),
        ("t=.x", FilterError::UnknownOperator { op: s(""), column: s("t") }),
        ("nope=eq.1", FilterError::UnknownColumn { column: s("nope") }),
        ("t=eq.1,nope=eq.1", FilterError::UnknownColumn { column: s("nope") }),
        ("i=eq.abc", invalid_value("i", "int4", "abc", "invalid input syntax for an integer")),
        ("i=eq.1.5", invalid_value("i", "int4", "1.5", "invalid input syntax for an integer")),
        ("i=eq.", invalid_value("i", "int4", "", "invalid input syntax for an integer")),
        ("i=eq.2147483648", invalid_value("i", "int4", "2147483648", "value out of range for the type")),
        ("s=gt.40000", invalid_value("s", "int2", "40000", "value out of range for the type")),
        ("i=in.(1,x)", invalid_value("i", "int4", "x", "invalid input syntax for an integer")),
        ("f=eq.1e999", invalid_value("f", "float8", "1e999", "value out of range for the type")),
        ("n=eq.1.2.3", invalid_value("n", "numeric", "1.2.3", super::numeric::NumericError::Syntax.reason())),
        ("n=eq.1e200000", invalid_value("n", "numeric", "1e200000", "value overflows numeric format")),
        ("d=eq.2026-02-30", invalid_value("d", "date", "2026-02-30", "date/time field value out of range")),
        (
            "b=eq.maybe",
            invalid_value(
                "b",
                "bool",
                "maybe",
                "invalid input syntax for a bool (expected true/false, t/f, yes/no, on/off, 1/0)",
            ),
        ),
        (hundred_and_one.as_str(), FilterError::TooManyValues),
        ("t=eq.\"abc", FilterError::UnterminatedQuote { column: s("t") }),
        ("t=eq.\"abc\\\"", FilterError::UnterminatedQuote { column: s("t") }),
        ("t=in.(\"abc)", FilterError::UnterminatedQuote { column: s("t") }),
        ("t=eq.\"abc\"def", FilterError::TextAfterQuote { column: s("t"), rest: s("def") }),
        ("t=eq.\"abc\"def,i=eq.1", FilterError::TextAfterQuote { column: s("t"), rest: s("def") }),
        ("t=in.a,b", bad_list("t", "expected `(` after `in.`")),
        ("t=in.", bad_list("t", "expected `(` after `in.`")),
        ("t=in.(a,b", bad_list("t", "missing `)`")),
        ("t=in.(a,", bad_list("t", "missing `)`")),
        ("t=in.(\"a\"", bad_list("t", "missing `)`")),
        ("t=in.(a,,b)", bad_list("t", "empty value in the list (quote it as \"\" for an empty string)")),
        ("t=in.(a)x", bad_list("t", "unexpected text after `)`")),
        ("t=in.(\"a\"b)", bad_list("t", "expected `,` or `)` after a quoted value")),
        (
            "t=like.abc\\",
            FilterError::InvalidPattern {
                op: s("like"),
                column: s("t"),
                reason: s("LIKE pattern must not end with escape character"),
            },
        ),
        ("t=is.maybe", FilterError::InvalidIsValue { column: s("t"), value: s("maybe") }),
        ("b=is.1", FilterError::InvalidIsValue { column: s("b"), value: s("1") }),
        ("i=is.true", FilterError::IsNeedsBool { column: s("i"), type_name: s("int4"), value: s("true") }),
        ("t=not.is.false", FilterError::IsNeedsBool { column: s("t"), type_name: s("text"), value: s("false") }),
        ("j=is.unknown", FilterError::IsNeedsBool { column: s("j"), type_name: s("jsonb"), value: s("unknown") }),
        ("j=lt.{}", unsupported("lt", "j", "jsonb")),
        ("j=gte.{}", unsupported("gte", "j", "jsonb")),
        ("i=like.1%", unsupported("like", "i", "int4")),
        ("u=ilike.a%", unsupported("ilike", "u", "uuid")),
        ("d=match.2026", unsupported("match", "d", "date")),
        ("b=imatch.t", unsupported("imatch", "b", "bool")),
        ("j=not.like.x", unsupported("like", "j", "jsonb")),
    ];
    for (spec, want) in cases {
        assert_eq!(error(spec), want, "{spec}");
    }
    for bad in [
        "u=eq.not-a-uuid",
        "u=eq.a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
        "ts=eq.yesterday",
        "ts=lt.2026-11-25 25:00",
        "d=eq.11/25/2026",
    ] {
        assert!(matches!(error(bad), FilterError::InvalidValue { .. }), "{bad}");
    }
}

#[test]
fn invalid_regexes_are_rejected_at_parse_time() {
    for (spec, fragment) in [
        ("t=match.(", "unclosed group"),
        ("t=imatch.[a-", "unclosed character class"),
        ("t=match.\\1", "backreferences are not supported"),
        ("t=match.(?=x)", "look-around"),
        ("t=match.a{1000}{1000}", "too large"),
    ] {
        match error(spec) {
            FilterError::InvalidPattern { reason, op, column } => {
                assert!(reason.contains(fragment), "{spec}: {reason}");
                assert!(!reason.contains('\n'), "{spec}: {reason}");
                assert_eq!(column, "t");
                assert!(spec.contains(&format!("={op}.")), "{spec}");
            }
            other => panic!("{spec}: {other:?}"),
        }
    }
}

#[test]
fn error_messages() {
    assert_eq!(error("nope=eq.1").to_string(), "invalid column for filter nope");
    let too_many = format!("i=in.({})", (1..=101).map(|i| i.to_string()).collect::<Vec<_>>().join(","));
    assert_eq!(error(&too_many).to_string(), "too many values for `in` filter. Maximum 100");
    assert_eq!(error("i=like.1%").to_string(), "operator like is not supported for column i of type int4");
    assert_eq!(
        error("i=eq.abc").to_string(),
        "invalid value \"abc\" for column i of type int4: invalid input syntax for an integer"
    );
    let unknown = error("t=foo.1").to_string();
    assert!(
        unknown.starts_with("unknown filter operator `foo` for column t; supported operators: eq, neq,"),
        "{unknown}"
    );
    assert!(unknown.contains("isdistinct") && unknown.contains("`not.`"), "{unknown}");
    assert_eq!(
        error("t=eq").to_string(),
        "invalid filter condition `t=eq`: expected `.` after the operator, as in `t=eq.value`"
    );
    // Long values are shortened in messages.
    let long = "x".repeat(500);
    let message = error(&format!("i=eq.{long}")).to_string();
    assert!(message.len() < 250 && message.contains('…'), "{message}");
}

// ---------------------------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------------------------

const ALL_TYPES: &[&str] = &[
    "int2",
    "int4",
    "int8",
    "float4",
    "float8",
    "numeric",
    "text",
    "varchar",
    "bpchar",
    "name",
    "citext",
    "uuid",
    "bool",
    "date",
    "timestamptz",
    "timestamp",
    "jsonb",
    "_int4",
];

/// Every column exists; its type depends on its name.
fn any_column_type(name: &str) -> Option<&'static str> {
    Some(ALL_TYPES[name.len() % ALL_TYPES.len()])
}

/// Strings made mostly of the filter's own punctuation and words.
fn filter_like_string() -> impl Strategy<Value = String> {
    let pieces = prop_oneof![
        Just("=".to_owned()),
        Just(".".to_owned()),
        Just(",".to_owned()),
        Just("(".to_owned()),
        Just(")".to_owned()),
        Just("\"".to_owned()),
        Just("\\".to_owned()),
        Just(" ".to_owned()),
        Just("%".to_owned()),
        Just("not.".to_owned()),
        proptest::sample::select(vec![
            "eq",
            "neq",
            "lt",
            "lte",
            "gt",
            "gte",
            "in",
            "like",
            "ilike",
            "match",
            "imatch",
            "is",
            "isdistinct",
            "null",
            "true",
            "unknown",
            "NaN",
            "Infinity",
            "-infinity",
            "1e5",
            "2026-11-25",
            "T10:00:00Z",
            "+05:30",
            U,
            "é",
        ])
        .prop_map(str::to_owned),
        "[a-z0-9_.+-]{0,6}",
    ];
    proptest::collection::vec(pieces, 0..24).prop_map(|parts| parts.concat())
}

fn numeric_string() -> impl Strategy<Value = String> {
    ("-?", "[0-9]{1,40}", proptest::option::of("[0-9]{1,40}")).prop_map(|(sign, int, frac)| match frac {
        Some(frac) => format!("{sign}{int}.{frac}"),
        None => format!("{sign}{int}"),
    })
}

/// A reference comparison of plain decimal strings: align the digits and compare them as text.
fn reference_cmp(a: &str, b: &str) -> Ordering {
    fn split(s: &str) -> (bool, String, String) {
        let (negative, s) = s.strip_prefix('-').map_or((false, s), |rest| (true, rest));
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        let int = int.trim_start_matches('0').to_owned();
        let frac = frac.trim_end_matches('0').to_owned();
        let zero = int.is_empty() && frac.is_empty();
        (negative && !zero, int, frac)
    }
    let (an, ai, af) = split(a);
    let (bn, bi, bf) = split(b);
    let width = ai.len().max(bi.len());
    let scale = af.len().max(bf.len());
    let digits = |i: &str, f: &str| format!("{i:0>width$}{f:0<scale$}");
    let magnitude = digits(&ai, &af).cmp(&digits(&bi, &bf));
    match (an, bn) {
        (false, false) => magnitude,
        (true, true) => magnitude.reverse(),
        (false, true) => Ordering::Greater,
        (true, false) => Ordering::Less,
    }
}

/// Checks every comparison operator of `c=<op>.b` against `want = cmp(a, b)` on a row holding `a`.
fn check_ops(type_name: &str, a: &str, b: &str, want: Ordering) -> Result<(), TestCaseError> {
    for (op, holds) in [
        ("eq", want.is_eq()),
        ("neq", want.is_ne()),
        ("lt", want.is_lt()),
        ("lte", want.is_le()),
        ("gt", want.is_gt()),
        ("gte", want.is_ge()),
        ("isdistinct", want.is_ne()),
    ] {
        prop_assert_eq!(eval(type_name, Some(a), &format!("{op}.{b}")), holds, "{} {} {}", a, op, b);
    }
    prop_assert_eq!(eval(type_name, Some(a), &format!("in.(0,{b})")), want.is_eq() || a.parse::<f64>() == Ok(0.0));
    Ok(())
}

/// A float as PostgreSQL writes it (in exponent form when Rust's shortest form is).
fn show_float(x: f64) -> String {
    match x {
        x if x.is_nan() => "NaN".to_owned(),
        f64::INFINITY => "Infinity".to_owned(),
        f64::NEG_INFINITY => "-Infinity".to_owned(),
        x => format!("{x:e}"),
    }
}

/// `digits × 10^exponent` written out without an exponent.
fn shift_point(digits: &str, exponent: i32) -> String {
    let point = digits.len() as i32 + exponent;
    if point <= 0 {
        format!("0.{}{digits}", "0".repeat((-point) as usize))
    } else if point as usize >= digits.len() {
        format!("{digits}{}", "0".repeat(point as usize - digits.len()))
    } else {
        format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics(spec in filter_like_string(), value in "[a-zA-Z0-9 .:+-]{0,12}") {
        if let Ok(filter) = Filter::parse(&spec, any_column_type) {
            let columns: Vec<(&str, &str)> =
                filter.columns().map(|c| (c, any_column_type(c).unwrap_or("text"))).collect();
            let rel = relation(&columns);
            for datum in [text(&value), Datum::Null, Datum::Absent] {
                let _ = filter.matches_row(&rel, &Row(vec![datum; columns.len()]));
            }
        }
    }

    #[test]
    fn parse_never_panics_on_arbitrary_text(spec in any::<String>()) {
        let _ = Filter::parse(&spec, any_column_type);
        let _ = Filter::parse(&spec, |_| None);
    }

    #[test]
    fn int8_comparisons_agree_with_i64(a in any::<i64>(), b in any::<i64>()) {
        check_ops("int8", &a.to_string(), &b.to_string(), a.cmp(&b))?;
        check_ops("numeric", &a.to_string(), &b.to_string(), a.cmp(&b))?;
    }

    #[test]
    fn int4_comparisons_agree_with_i32(a in any::<i32>(), b in -3i32..3) {
        let b = a.saturating_add(b);
        check_ops("int4", &a.to_string(), &b.to_string(), a.cmp(&b))?;
    }

    #[test]
    fn numeric_comparisons_agree_with_decimal_order(a in numeric_string(), b in numeric_string()) {
        check_ops("numeric", &a, &b, reference_cmp(&a, &b))?;
        // The same value with zeros added at both ends is equal.
        let (sign, unsigned) = a.strip_prefix('-').map_or(("", a.as_str()), |rest| ("-", rest));
        let padded = if unsigned.contains('.') {
            format!("{sign}000{unsigned}000")
        } else {
            format!("{sign}000{unsigned}.000")
        };
        prop_assert!(eval("numeric", Some(&a), &format!("eq.{padded}")), "{} vs {}", a, padded);
    }

    #[test]
    fn numeric_exponents_agree_with_shifted_digits(
        digits in "[1-9][0-9]{0,30}",
        exponent in -40i32..40,
        nudge in any::<bool>(),
    ) {
        let plain = shift_point(&digits, exponent);
        let exact = eval("numeric", Some(&plain), &format!("eq.{digits}e{exponent}"));
        prop_assert!(exact, "{} vs {}e{}", plain, digits, exponent);
        // One unit in the last place more is greater.
        let bigger = format!("{digits}1");
        let (row, want) =
            if nudge { (shift_point(&bigger, exponent - 1), Ordering::Greater) } else { (plain, Ordering::Equal) };
        prop_assert_eq!(eval("numeric", Some(&row), &format!("gt.{digits}E{exponent}")), want.is_gt());
    }

    #[test]
    fn float8_comparisons_agree_with_f64(a in any::<f64>(), b in any::<f64>()) {
        check_ops("float8", &show_float(a), &show_float(b), types::float_cmp(a, b))?;
    }
}

/// Whether the index would find a row `value` for filter `c=<spec>`: the filter has index keys and the row's
/// key is among them; `None` when the filter has no index keys.
fn index_finds(type_name: &str, value: Option<&str>, spec: &str) -> Option<bool> {
    let rel = relation(&[("c", type_name)]);
    let filter = Filter::for_relation(&format!("c={spec}"), &rel).ok()?;
    let keys = filter.index_keys()?;
    assert_eq!(&*keys.column, "c");
    let mut buf = Vec::new();
    Some(keys.kind.row_key(&datum(value), &mut buf) && keys.keys.iter().any(|k| **k == *buf))
}

/// The filter index never loses a match: every case a filter passes, the index finds (`eq` and `in` on every
/// type but `numeric` are indexed; everything else, and anything under `not.`, is not).
#[test]
fn the_index_finds_every_row_the_filter_passes() {
    let mut indexed = 0;
    for &(type_name, value, spec, expected) in CASES {
        let lower = spec.to_ascii_lowercase();
        let eq_or_in = lower.starts_with("eq.") || lower.starts_with("in.");
        let found = index_finds(type_name, value, spec);
        if !eq_or_in || type_name == "numeric" {
            assert_eq!(found, None, "c={spec} on {type_name} is not indexed");
            continue;
        }
        let found = found.unwrap_or_else(|| panic!("c={spec} on {type_name} has index keys"));
        indexed += 1;
        if expected {
            assert!(found, "c={spec} on {type_name}: the filter passes {value:?}, the index must find it");
        }
        assert_eq!(index_finds(type_name, value, &format!("not.{spec}")), None, "not.{spec} is not indexed");
        assert_eq!(index_finds(type_name, None, spec), Some(false), "NULL passes no eq/in");
    }
    assert!(indexed > 40, "the table covers the indexed types ({indexed} cases)");
}

#[test]
fn the_index_takes_the_narrowest_eq_or_in_condition() {
    let rel = relation(&[("id", "int8"), ("status", "text"), ("n", "numeric")]);
    let keys = |spec: &str| Filter::for_relation(spec, &rel).unwrap().index_keys();
    let k = keys("status=in.(a,b,a),id=in.(1,2,3)").unwrap();
    assert_eq!((&*k.column, k.keys.len()), ("status", 2), "duplicates count once");
    assert_eq!(&*keys("id=gt.5,status=eq.x").unwrap().column, "status");
    assert!(keys("id=gt.5,status=neq.x").is_none());
    assert!(keys("n=eq.1").is_none());
    assert!(keys("status=not.in.(a)").is_none());
    assert!(keys("").is_none());
    assert!(keys("id=in.()").unwrap().keys.is_empty(), "in.() passes nothing, and is found by nothing");
    assert!(Filter::for_relation("id=gt.5", &rel).unwrap().is_unindexed());
    assert!(!Filter::for_relation("id=gt.5,id=eq.6", &rel).unwrap().is_unindexed());
    assert!(!Filter::default().is_unindexed());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    /// Spellings of equal values (case, whitespace, signs, zero forms, trailing blanks) all land on one key
    /// whenever the filter says they are equal.
    #[test]
    fn equal_values_have_equal_keys(
        type_name in proptest::sample::select(vec![
            "int2", "int8", "float4", "float8", "text", "bpchar", "citext", "uuid", "bool", "date",
            "timestamptz", "timestamp", "jsonb", "name",
        ]),
        a in proptest::sample::select(vec![
            "0", "-0", "+0", " 1", "1", "01", "1.0", "1e0", "NaN", "nan", "Infinity", "t", "TRUE", "yes", "on",
            "f", "no", "off", "a", "A", "a ", "ÄB", "äb", "2026-11-25", "2026-11-25 10:00:00+00",
            "2026-11-25T10:00:00Z", "2026-11-25 11:00:00+01", "infinity", "-infinity", U,
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "{\"a\": 1}",
        ]),
        b in proptest::sample::select(vec![
            "0", "-0", "1", "1.0", "NaN", "t", "true", "f", "a", "a  ", "äb", "2026-11-25",
            "2026-11-25 10:00:00+00", "infinity", U, "{\"a\": 1}",
        ]),
    ) {
        if let Some(passes) = index_finds(type_name, Some(a), &format!("eq.{b}")) {
            if eval_opt(type_name, Some(a), &format!("eq.{b}")) == Some(true) {
                prop_assert!(passes, "{} eq.{} on {}", a, b, type_name);
            }
        }
        if let Some(passes) = index_finds(type_name, Some(a), &format!("in.({b},zz)")) {
            if eval_opt(type_name, Some(a), &format!("in.({b},zz)")) == Some(true) {
                prop_assert!(passes, "{} in.({}) on {}", a, b, type_name);
            }
        }
    }
}

/// [`eval`] for specs that may not parse (`None`).
fn eval_opt(type_name: &str, value: Option<&str>, spec: &str) -> Option<bool> {
    let rel = relation(&[("c", type_name)]);
    let filter = Filter::for_relation(&format!("c={spec}"), &rel).ok()?;
    Some(filter.matches_row(&rel, &Row(vec![datum(value)])))
}
