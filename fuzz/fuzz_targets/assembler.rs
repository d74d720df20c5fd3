//! Up to 64 payloads (generated, mutated or junk) pushed through one change `Assembler`; every change it
//! emits is checked and written as JSON.
#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use walcast_fuzz::harness;

fuzz_target!(|data: &[u8]| harness::assembler(&mut Unstructured::new(data)));
