//! Fuzzes the connection core (issue 20, item 6) with what an authenticated peer may send: arbitrary
//! plaintext in its TLS records, raw bytes where records belong, close_notify; through the receive path.
//! The body and its invariants are `harness::server_session`, shared with the property tests that run it
//! on stable Rust in CI (`rust/core/tests/adversary.rs`).
#![no_main]

#[path = "../../rust/core/tests/harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::server_session(data));
