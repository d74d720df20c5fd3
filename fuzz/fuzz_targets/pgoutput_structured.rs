//! A generated pgoutput message: `decode(encode(m)) == m`, every strict prefix rejected, then mutated
//! (bit flips, forged lengths and counts, truncation, splices) and decoded without a panic.
#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use walcast_fuzz::harness;

fuzz_target!(|data: &[u8]| harness::pgoutput_structured(&mut Unstructured::new(data)));
