//! Phoenix frames: raw bytes, structured text frames (vsn 1.0.0 and 2.0.0, join payloads) and binary kind-3
//! frames through `decode_text`, `decode_binary` and `parse_join`.
#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use walcast_fuzz::harness;

fuzz_target!(|data: &[u8]| harness::phoenix(&mut Unstructured::new(data)));
