//! The fuzz harness of walcast as a library, for the libFuzzer targets in `fuzz_targets/`.
//!
//! The generators and checks live in [`harness`], which `cargo test` also compiles (see `src/fuzz_tests.rs`
//! in the walcast crate), so a libFuzzer finding and a proptest finding are the same check failing.

pub use walcast;

pub mod harness;

/// libFuzzer's input, read through `arbitrary`, drives the same generators as proptest's bytes.
impl harness::Entropy for arbitrary::Unstructured<'_> {
    fn fill(&mut self, buf: &mut [u8]) {
        // Pads with zeros once the input runs out; that is never an error.
        let _ = self.fill_buffer(buf);
    }

    fn exhausted(&self) -> bool {
        self.is_empty()
    }
}
