//! Strict Ed25519 for Python: the one key check and the one signature verifier
//! (`vpn_packet_core::ed25519` says which keys and signatures count, and why).
//!
//! Verification keeps the last few keys it checked, so the check of a key (a scalar multiplication to prove
//! it is in the prime-order subgroup) is paid once per key, not per signature: the keys whose signatures
//! are verified are the configured peers' keys (a hello's key is looked up among them first), again at
//! every connection.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use pyo3::prelude::*;
use vpn_packet_core::ed25519::{check_public_key, verify_with, KeyProblem, VerifyingKey, PUBLIC_KEY_LEN};
use vpn_packet_core::key_checks::accept_public_key;

use crate::errors::no_panic;

/// How many checked keys are kept: a node's peers that connect often; a key not among them is checked again.
const CHECKED_KEYS: usize = 64;

static CHECKED: Mutex<VecDeque<([u8; PUBLIC_KEY_LEN], VerifyingKey)>> = Mutex::new(VecDeque::new());

/// The checked key of `raw` (from the kept ones, or checked now and kept), or why it is refused.
fn checked_key(raw: &[u8]) -> Result<VerifyingKey, KeyProblem> {
    let mut kept = CHECKED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, key)) = kept.iter().find(|(bytes, _)| bytes[..] == *raw) {
        return Ok(*key);
    }
    let key = check_public_key(raw)?;
    if kept.len() >= CHECKED_KEYS {
        kept.pop_front();
    }
    kept.push_back((key.to_bytes(), key));
    Ok(key)
}

/// Why `key` (raw bytes) is not a public key this project trusts, in one sentence; None when it is one.
/// The TLS core's check (`key_checks::accept_public_key`), so a key accepted here (a config's peer keys,
/// read at start) is not checked again when the core builds its peer table: with 10,000 peers that is
/// half a second of a node's start. Only accepted keys are remembered there, in a bounded set.
#[pyfunction]
pub fn public_key_problem(key: &[u8]) -> PyResult<Option<String>> {
    no_panic(|| Ok(accept_public_key(key).err().map(|problem| problem.to_string())))
}

/// Whether `signature` is a strict Ed25519 signature of `message` by `public_key` (a checked key,
/// canonical `s`, no small-order `R`). Never raises for bad input: it is simply not a signature.
#[pyfunction]
pub fn verify_signature(
    py: Python<'_>,
    public_key: &[u8],
    message: &[u8],
    signature: &[u8],
) -> PyResult<bool> {
    no_panic(|| {
        let Ok(key) = checked_key(public_key) else {
            return Ok(false);
        };
        Ok(py.detach(|| verify_with(&key, message, signature).is_ok()))
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(public_key_problem, m)?)?;
    m.add_function(wrap_pyfunction!(verify_signature, m)?)?;
    Ok(())
}
