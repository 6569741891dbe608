//! Fuzzes the connection core (issue 20, item 6) with what a server may send to a dialling client: raw
//! bytes, plaintext after TLS, an answer after the challenge, acks after the answer.
//! The body and its invariants are `harness::client_session`, shared with the property tests that run it
//! on stable Rust in CI (`rust/core/tests/adversary.rs`).
#![no_main]

#[path = "../../rust/core/tests/harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::client_session(data));
