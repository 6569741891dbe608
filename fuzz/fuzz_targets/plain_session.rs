//! Fuzzes the connection core (issue 20, item 6) in plaintext (an insecure node): arbitrary bytes after a
//! valid hello, or where the hello belongs.
//! The body and its invariants are `harness::plain_session`, shared with the property tests that run it on
//! stable Rust in CI (`rust/core/tests/adversary.rs`).
#![no_main]

#[path = "../../rust/core/tests/harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::plain_session(data));
