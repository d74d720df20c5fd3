//! `postgres_changes` filters: raw and structured specs parsed against a fixed relation (int4, int8, text,
//! uuid, bool, timestamptz, numeric, jsonb, _int4 and more) and evaluated on generated rows.
#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use walcast_fuzz::harness;

fuzz_target!(|data: &[u8]| harness::filter(&mut Unstructured::new(data)));
