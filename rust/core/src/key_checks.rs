//! The one place where the TLS core judges an Ed25519 key or signature from a peer or a configuration.
//!
//! Every public key the connection core accepts (a key-mode server's certificate, an Ed25519 key in a
//! CA-issued certificate, a configured peer key, this node's own key) goes through [`accept_public_key`],
//! and every hello signature through [`verify_signature`]. Both are the strict checks of
//! [`crate::ed25519`] (canonical, not of small order, in the prime-order subgroup; strict verification), so
//! that TLS and the hello trust exactly the keys the rest of the project trusts.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use crate::ed25519::{check_public_key, verify_strict, KeyProblem};
use crate::handshake::PUBLIC_KEY_LEN;

/// Keys already accepted (a key's verdict never changes), so that rebuilding the TLS setup's peer table
/// after a peer change does not redo a scalar multiplication per known peer: with 10,000 peers that is half
/// a second per change. Only accepted keys are kept; cleared when full, so at most a few MB.
static ACCEPTED: Mutex<Option<HashSet<[u8; PUBLIC_KEY_LEN]>>> = Mutex::new(None);
const ACCEPTED_CAPACITY: usize = 1 << 17;

/// `key` as a public key this node may trust, or why not.
pub fn accept_public_key(key: &[u8]) -> Result<[u8; PUBLIC_KEY_LEN], KeyProblem> {
    let bytes: [u8; PUBLIC_KEY_LEN] = key.try_into().map_err(|_| KeyProblem::WrongLength(key.len()))?;
    if ACCEPTED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .is_some_and(|accepted| accepted.contains(&bytes))
    {
        return Ok(bytes);
    }
    check_public_key(key)?; // outside the lock: a scalar multiplication
    let mut accepted = ACCEPTED.lock().unwrap_or_else(PoisonError::into_inner);
    let accepted = accepted.get_or_insert_with(HashSet::new);
    if accepted.len() >= ACCEPTED_CAPACITY {
        accepted.clear();
    }
    accepted.insert(bytes);
    Ok(bytes)
}

/// Whether `signature` is the Ed25519 signature of `message` by `public_key`, strictly.
pub fn verify_signature(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    verify_strict(public_key, message, signature).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_weak_keys_and_garbage_are_refused() {
        assert_eq!(accept_public_key(&[1; 31]), Err(KeyProblem::WrongLength(31)));
        // 32 zero bytes: a point of small order, with which signatures can be forged.
        assert_eq!(accept_public_key(&[0; 32]), Err(KeyProblem::SmallOrder));
        assert!(!verify_signature(&[0; 32], b"m", &[0; 64]));
        assert!(!verify_signature(&[1; 31], b"m", &[0; 64]));
    }

    #[test]
    fn an_accepted_key_stays_accepted_and_a_refused_one_refused() {
        use ed25519_dalek::SigningKey;
        let key = SigningKey::from_bytes(&[42; 32]).verifying_key().to_bytes();
        assert_eq!(accept_public_key(&key), Ok(key));
        assert_eq!(accept_public_key(&key), Ok(key)); // from the memo
        for _ in 0..2 {
            assert_eq!(accept_public_key(&[0; 32]), Err(KeyProblem::SmallOrder));
        }
    }
}
