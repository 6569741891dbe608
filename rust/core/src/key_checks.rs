//! The one place where an Ed25519 key or signature from a peer is judged.
//!
//! Every public key this crate accepts from a certificate or a configuration, and every hello signature it
//! checks, goes through [`accept_public_key`] and [`verify_signature`]. The weak-keys issue adds strict checks
//! (canonical encoding, not of small order, in the prime-order subgroup; strict signature verification) as
//! `crate::ed25519`; when that module is merged, these two functions call it and nothing else changes.
//!
//! Until then: a key must have the right length, and a signature is verified with the TLS provider's
//! Ed25519 (aws-lc), which refuses keys that do not decode to a curve point.

use std::fmt;

use rustls::pki_types::SignatureVerificationAlgorithm;

use crate::handshake::{PUBLIC_KEY_LEN, SIGNATURE_LEN};

/// Why a public key is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRefusal {
    /// Not 32 bytes.
    BadLength(usize),
    /// Refused by the strict checks (non-canonical, small order, or outside the prime-order subgroup).
    Weak,
}

impl KeyRefusal {
    /// A short stable name, for counting: `bad_key_length`, `weak_key`.
    pub fn reason(&self) -> &'static str {
        match self {
            KeyRefusal::BadLength(_) => "bad_key_length",
            KeyRefusal::Weak => "weak_key",
        }
    }
}

impl fmt::Display for KeyRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyRefusal::BadLength(n) => write!(f, "an Ed25519 public key has 32 bytes, not {n}"),
            KeyRefusal::Weak => write!(f, "a weak Ed25519 public key (refused by the strict key check)"),
        }
    }
}

impl std::error::Error for KeyRefusal {}

/// `key` as a public key this node may trust, or why not.
pub fn accept_public_key(key: &[u8]) -> Result<[u8; PUBLIC_KEY_LEN], KeyRefusal> {
    key.try_into().map_err(|_| KeyRefusal::BadLength(key.len()))
}

/// Whether `signature` is the Ed25519 signature of `message` by `public_key`.
pub fn verify_signature(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    if accept_public_key(public_key).is_err() || signature.len() != SIGNATURE_LEN {
        return false;
    }
    rustls::crypto::aws_lc_rs::default_provider()
        .signature_verification_algorithms
        .mapping
        .iter()
        .find(|(scheme, _)| *scheme == rustls::SignatureScheme::ED25519)
        .and_then(|(_, algs)| algs.first())
        .is_some_and(|alg: &&dyn SignatureVerificationAlgorithm| {
            alg.verify_signature(public_key, message, signature).is_ok()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_garbage_are_refused() {
        assert_eq!(accept_public_key(&[1; 31]), Err(KeyRefusal::BadLength(31)));
        assert!(accept_public_key(&[1; 32]).is_ok());
        assert!(!verify_signature(&[1; 32], b"m", &[0; 64]));
        assert!(!verify_signature(&[1; 31], b"m", &[0; 64]));
        assert!(!verify_signature(&[1; 32], b"m", &[0; 63]));
    }
}
