//! Property tests of the strict Ed25519 rules: no signature at all verifies under a refused key, and every
//! honest signature under an honest key does.

use curve25519_dalek::constants::EIGHT_TORSION;
use curve25519_dalek::edwards::CompressedEdwardsY;
use ed25519_dalek::{Signer, SigningKey};
use proptest::prelude::*;
use vpn_packet_core::ed25519::{check_public_key, verify_strict, SignatureProblem};

/// A refused key: a small-order point, or an honest key plus a torsion point (mixed order).
fn refused_key() -> impl Strategy<Value = ([u8; 32], [u8; 32])> {
    (any::<[u8; 32]>(), 0usize..8, any::<bool>()).prop_map(|(seed, torsion, mixed)| {
        let point = if mixed {
            // Any torsion point but the identity (which would leave the honest key as it is).
            let honest = SigningKey::from_bytes(&seed).verifying_key();
            CompressedEdwardsY(honest.to_bytes()).decompress().unwrap() + EIGHT_TORSION[1 + torsion % 7]
        } else {
            EIGHT_TORSION[torsion]
        };
        (point.compress().to_bytes(), seed)
    })
}

/// Signatures a forger would try: arbitrary bytes, R a torsion point with small s, and the honest
/// signature of the key underneath a mixed-order one.
fn forgery(seed: [u8; 32], message: &[u8], kind: u8, bytes: [u8; 64]) -> [u8; 64] {
    match kind % 3 {
        0 => bytes,
        1 => {
            let mut out = [0u8; 64];
            out[..32].copy_from_slice(&EIGHT_TORSION[usize::from(bytes[0] % 8)].compress().to_bytes());
            out[32] = bytes[1] % 8;
            out
        }
        _ => SigningKey::from_bytes(&seed).sign(message).to_bytes(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn nothing_verifies_under_a_refused_key(
        (key, seed) in refused_key(),
        message in proptest::collection::vec(any::<u8>(), 0..64),
        kind in any::<u8>(),
        bytes in proptest::collection::vec(any::<u8>(), 64),
    ) {
        prop_assert!(check_public_key(&key).is_err());
        let signature = forgery(seed, &message, kind, bytes.try_into().unwrap());
        prop_assert!(matches!(
            verify_strict(&key, &message, &signature),
            Err(SignatureProblem::BadKey(_))
        ));
    }

    #[test]
    fn honest_signatures_verify(seed in any::<[u8; 32]>(), message in proptest::collection::vec(any::<u8>(), 0..256)) {
        let signer = SigningKey::from_bytes(&seed);
        let key = signer.verifying_key().to_bytes();
        prop_assert!(check_public_key(&key).is_ok());
        prop_assert_eq!(verify_strict(&key, &message, &signer.sign(&message).to_bytes()), Ok(()));
    }
}
