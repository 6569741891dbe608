//! Fuzzes the connection core (issue 20, item 6) with what anyone may send before authentication:
//! arbitrary bytes to a fresh server.
//! The body and its invariants are `harness::server_preauth`, shared with the property tests that run it
//! on stable Rust in CI (`rust/core/tests/adversary.rs`).
#![no_main]

#[path = "../../rust/core/tests/harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::server_preauth(data));
