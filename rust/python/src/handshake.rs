//! The connection handshake for Python: challenge, hello, answer and the signed transcript.
//!
//! The protocol is `vpn_packet_core::handshake` (its docs draw the messages); this file converts buffers,
//! tuples and errors. Parsers return `(message, consumed)` when complete and `(None, needed)` while at
//! least `needed` more bytes are required, and raise `FramingError` (with a `reason`) as soon as the bytes
//! cannot be the expected message.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use vpn_packet_core::handshake::{
    self, Answer, Hello, Parsed, CHALLENGE_LEN, MAGIC, MAX_ANSWER_LEN, MAX_HELLO_LEN, MAX_PEER_ID_LEN,
    NONCE_LEN, PROTOCOL_VERSION, PUBLIC_KEY_LEN, SIGNATURE_LEN,
};

use crate::buffer::with_bytes;
use crate::errors::{handshake_error, no_panic};

fn fixed<const N: usize>(what: &str, bytes: &[u8]) -> PyResult<[u8; N]> {
    bytes
        .try_into()
        .map_err(|_| PyValueError::new_err(format!("{what} must be {N} bytes, got {}", bytes.len())))
}

/// The challenge a server sends first: a fresh `nonce` of 32 random bytes.
#[pyfunction]
pub fn encode_challenge<'py>(py: Python<'py>, nonce: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    no_panic(|| {
        Ok(PyBytes::new(
            py,
            &handshake::encode_challenge(&fixed("nonce", nonce)?),
        ))
    })
}

/// Parses a challenge: `(nonce, consumed)` or `(None, needed)`.
#[pyfunction]
pub fn parse_challenge<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
) -> PyResult<(Option<Bound<'py, PyBytes>>, usize)> {
    no_panic(|| {
        with_bytes(data, |bytes| match handshake::parse_challenge(bytes) {
            Ok(Parsed::NeedMore { needed }) => Ok((None, needed)),
            Ok(Parsed::Done { message, consumed }) => Ok((Some(PyBytes::new(py, &message)), consumed)),
            Err(err) => Err(handshake_error(&err)),
        })?
    })
}

/// A hello: `peer_id` (1..=255 bytes of UTF-8), `epoch`, and with keys the 32-byte `public_key` and the
/// 64-byte `signature` of `hello_transcript(...)`.
#[pyfunction]
#[pyo3(signature = (peer_id, epoch, public_key = None, signature = None))]
pub fn encode_hello<'py>(
    py: Python<'py>,
    peer_id: &str,
    epoch: u64,
    public_key: Option<&[u8]>,
    signature: Option<&[u8]>,
) -> PyResult<Bound<'py, PyBytes>> {
    no_panic(|| {
        let hello = Hello {
            peer_id,
            epoch,
            public_key,
            signature,
        };
        let wire = handshake::encode_hello(&hello).map_err(|err| handshake_error(&err))?;
        Ok(PyBytes::new(py, &wire))
    })
}

/// Parses a hello: `((peer_id, epoch, public_key | None, signature | None), consumed)` or `(None, needed)`.
#[pyfunction]
pub fn parse_hello<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
) -> PyResult<(Option<Bound<'py, PyTuple>>, usize)> {
    no_panic(|| {
        with_bytes(data, |bytes| match handshake::parse_hello(bytes) {
            Ok(Parsed::NeedMore { needed }) => Ok((None, needed)),
            Ok(Parsed::Done { message, consumed }) => {
                let key = message.public_key.map(|k| PyBytes::new(py, k));
                let sig = message.signature.map(|s| PyBytes::new(py, s));
                let tuple = (message.peer_id, message.epoch, key, sig).into_pyobject(py)?;
                Ok((Some(tuple), consumed))
            }
            Err(err) => Err(handshake_error(&err)),
        })?
    })
}

/// The bytes a client signs with its key: see `vpn_packet_core::handshake::hello_transcript`.
#[pyfunction]
pub fn hello_transcript<'py>(
    py: Python<'py>,
    nonce: &[u8],
    server_public_key: &[u8],
    peer_id: &str,
    epoch: u64,
    client_public_key: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    no_panic(|| {
        let transcript = handshake::hello_transcript(
            &fixed("nonce", nonce)?,
            &fixed("server_public_key", server_public_key)?,
            peer_id,
            epoch,
            &fixed("client_public_key", client_public_key)?,
        )
        .map_err(|err| handshake_error(&err))?;
        Ok(PyBytes::new(py, &transcript))
    })
}

/// An answer: `code` (0 accepts; see `ANSWER_REASONS`) and a text (cut to 255 bytes).
#[pyfunction]
pub fn encode_answer<'py>(py: Python<'py>, code: u8, text: &str) -> PyResult<Bound<'py, PyBytes>> {
    no_panic(|| Ok(PyBytes::new(py, &handshake::encode_answer(code, text))))
}

/// Parses an answer: `((code, text), consumed)` or `(None, needed)`.
#[pyfunction]
pub fn parse_answer(data: &Bound<'_, PyAny>) -> PyResult<(Option<(u8, String)>, usize)> {
    no_panic(|| {
        with_bytes(data, |bytes| match handshake::parse_answer(bytes) {
            Ok(Parsed::NeedMore { needed }) => Ok((None, needed)),
            Ok(Parsed::Done {
                message: (code, text),
                consumed,
            }) => Ok((Some((code, text.to_owned())), consumed)),
            Err(err) => Err(handshake_error(&err)),
        })?
    })
}

/// Registers the functions and the protocol constants (Python never restates them).
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("PROTOCOL_MAGIC", PyBytes::new(m.py(), MAGIC))?;
    m.add("PROTOCOL_VERSION", PROTOCOL_VERSION)?;
    m.add("NONCE_LEN", NONCE_LEN)?;
    m.add("CHALLENGE_LEN", CHALLENGE_LEN)?;
    m.add("PUBLIC_KEY_LEN", PUBLIC_KEY_LEN)?;
    m.add("SIGNATURE_LEN", SIGNATURE_LEN)?;
    m.add("MAX_HELLO_LEN", MAX_HELLO_LEN)?;
    m.add("MAX_PEER_ID_LEN", MAX_PEER_ID_LEN)?;
    m.add("MAX_ANSWER_LEN", MAX_ANSWER_LEN)?;
    let reasons: Vec<&str> = Answer::ALL.iter().map(|a| a.reason()).collect();
    m.add("ANSWER_REASONS", PyTuple::new(m.py(), reasons)?)?;
    m.add_function(wrap_pyfunction!(encode_challenge, m)?)?;
    m.add_function(wrap_pyfunction!(parse_challenge, m)?)?;
    m.add_function(wrap_pyfunction!(encode_hello, m)?)?;
    m.add_function(wrap_pyfunction!(parse_hello, m)?)?;
    m.add_function(wrap_pyfunction!(hello_transcript, m)?)?;
    m.add_function(wrap_pyfunction!(encode_answer, m)?)?;
    m.add_function(wrap_pyfunction!(parse_answer, m)?)?;
    Ok(())
}
