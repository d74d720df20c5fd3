//! Arbitrary bytes as one pgoutput payload, outside and inside a stream block: never a panic, and whatever
//! decodes is a fixed point of encode-then-decode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walcast_fuzz::harness;

fuzz_target!(|data: &[u8]| harness::pgoutput_bytes(data));
