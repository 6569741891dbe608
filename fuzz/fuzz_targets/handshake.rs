//! Fuzzes the handshake parsers with what an unauthenticated client or server may send: none may panic,
//! a parse that completes must re-encode to the bytes it consumed, and "need more" never asks past a bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vpn_packet_core::handshake::{
    encode_answer, encode_hello, parse_answer, parse_challenge, parse_hello, Parsed, MAX_ANSWER_LEN,
    MAX_HELLO_LEN,
};

fuzz_target!(|data: &[u8]| {
    match parse_hello(data) {
        Ok(Parsed::Done { message, consumed }) => {
            assert!(consumed <= MAX_HELLO_LEN);
            assert_eq!(encode_hello(&message).unwrap(), &data[..consumed]);
        }
        Ok(Parsed::NeedMore { needed }) => assert!(data.len() + needed <= MAX_HELLO_LEN),
        Err(_) => {}
    }
    if let Ok(Parsed::Done { message: (code, text), consumed }) = parse_answer(data) {
        assert!(consumed <= MAX_ANSWER_LEN);
        assert_eq!(encode_answer(code, text), &data[..consumed]);
    }
    let _ = parse_challenge(data);
});
