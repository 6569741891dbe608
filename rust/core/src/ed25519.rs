//! Strict Ed25519: which public keys are keys, and which signatures are signatures.
//!
//! Ed25519 as RFC 8032 and most libraries verify it (OpenSSL, ring, and so Python's `cryptography`) accepts
//! public keys that no honest key generator produces: the eight points of small order (32 zero bytes among
//! them) and "mixed-order" points (a real key plus a torsion point). With a small-order key `A`, the
//! equation `[s]B = R + [k]A` no longer binds the message: `R` = identity and `s` = 0 verify for every
//! message whenever `[k]A` is the identity, about one time in four or eight. So a peer configured with such a
//! key (a placeholder pasted into a config, a key from a broken tool, an entry read from a shared store) can
//! be impersonated by anyone, without any private key. Mixed-order keys give one private key eight public
//! strings, which breaks "a peer is its key string".
//!
//! The rules here are the strict ones (as in Zcash's ZIP-215 discussion, libsodium's
//! `crypto_sign_verify_detached` and dalek's `verify_strict`), applied wherever this project trusts a key:
//!
//! - a public key must decode to a curve point, re-encode to the same 32 bytes (canonical: `y < p`, and no
//!   "negative zero" `x`), not be of small order, and lie in the prime-order subgroup (`[L]A` = identity);
//! - a signature's `s` must be canonical (`s < L`, so a signature has one encoding: no malleability), and its
//!   `R` must be a canonical encoding of a point that is not of small order;
//! - then the cofactorless equation, comparing the encoding of `[s]B - [k]A` with `R` (dalek's
//!   `verify_strict`).
//!
//! One verifier for the whole project: the hello's signature (and later mesh memberships) through
//! `verify_strict`, every configured, presented or certified key through `check_public_key`. Each check
//! reports why it refused, so a config error or a log line can say it.

use core::fmt;

use curve25519_dalek::edwards::CompressedEdwardsY;
use curve25519_dalek::scalar::Scalar;
use ed25519_dalek::Signature;
/// A checked public key (`check_public_key`), decompressed, ready to verify with.
pub use ed25519_dalek::VerifyingKey;

/// Length of a raw Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature (`R` then `s`).
pub const SIGNATURE_LEN: usize = 64;

/// Why a public key is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyProblem {
    /// Not 32 bytes.
    WrongLength(usize),
    /// The bytes are no point of the curve.
    NotAPoint,
    /// A point, but not in its one canonical encoding (`y >= p`, or the sign bit set with `x` = 0).
    NonCanonical,
    /// One of the eight points of small order (32 zero bytes, the identity, ...).
    SmallOrder,
    /// A point with a torsion component: outside the prime-order subgroup that real keys live in.
    MixedOrder,
}

impl KeyProblem {
    /// A short stable name, for counters and tests.
    pub fn reason(self) -> &'static str {
        match self {
            KeyProblem::WrongLength(_) => "wrong_length",
            KeyProblem::NotAPoint => "not_a_point",
            KeyProblem::NonCanonical => "non_canonical",
            KeyProblem::SmallOrder => "small_order",
            KeyProblem::MixedOrder => "mixed_order",
        }
    }
}

impl fmt::Display for KeyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyProblem::WrongLength(n) => {
                write!(f, "an Ed25519 public key has {PUBLIC_KEY_LEN} bytes, not {n}")
            }
            KeyProblem::NotAPoint => f.write_str("the bytes are not a point of the Ed25519 curve"),
            KeyProblem::NonCanonical => {
                f.write_str("the point is not in its canonical encoding (one key, one string)")
            }
            KeyProblem::SmallOrder => f.write_str(
                "it is a point of small order (such as 32 zero bytes): with it, a signature can be \
                 forged without any private key",
            ),
            KeyProblem::MixedOrder => f.write_str(
                "the point lies outside the prime-order subgroup (a key plus a torsion point): no key \
                 generator makes it, and it would give one private key several public strings",
            ),
        }
    }
}

/// Why a signature is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureProblem {
    /// The public key is refused (see `KeyProblem`).
    BadKey(KeyProblem),
    /// Not 64 bytes.
    WrongLength(usize),
    /// `s` is not below the group order `L` (a second encoding of some signature).
    NonCanonicalS,
    /// `R` is not a canonical encoding of a curve point.
    NonCanonicalR,
    /// `R` is a point of small order.
    SmallOrderR,
    /// Well-formed, but not a signature of this message by this key.
    Mismatch,
}

impl SignatureProblem {
    /// A short stable name, for counters and tests.
    pub fn reason(self) -> &'static str {
        match self {
            SignatureProblem::BadKey(_) => "bad_key",
            SignatureProblem::WrongLength(_) => "wrong_length",
            SignatureProblem::NonCanonicalS => "non_canonical_s",
            SignatureProblem::NonCanonicalR => "non_canonical_r",
            SignatureProblem::SmallOrderR => "small_order_r",
            SignatureProblem::Mismatch => "mismatch",
        }
    }
}

impl fmt::Display for SignatureProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignatureProblem::BadKey(problem) => write!(f, "the public key is refused: {problem}"),
            SignatureProblem::WrongLength(n) => {
                write!(f, "an Ed25519 signature has {SIGNATURE_LEN} bytes, not {n}")
            }
            SignatureProblem::NonCanonicalS => f.write_str("the signature's s is not below the group order"),
            SignatureProblem::NonCanonicalR => {
                f.write_str("the signature's R is not a canonical encoding of a curve point")
            }
            SignatureProblem::SmallOrderR => f.write_str("the signature's R is a point of small order"),
            SignatureProblem::Mismatch => f.write_str("the signature does not verify with this key"),
        }
    }
}

/// A point of the curve from its encoding, only if the encoding is the canonical one.
fn canonical_point(bytes: [u8; 32]) -> Result<curve25519_dalek::edwards::EdwardsPoint, KeyProblem> {
    let compressed = CompressedEdwardsY(bytes);
    let point = compressed.decompress().ok_or(KeyProblem::NotAPoint)?;
    // dalek decodes `y` modulo p and takes the sign bit even for x = 0; re-encoding gives the one canonical
    // string, so any other encoding of the same point is refused here.
    if point.compress() != compressed {
        return Err(KeyProblem::NonCanonical);
    }
    Ok(point)
}

/// A public key this project trusts: canonical, not of small order, in the prime-order subgroup.
pub fn check_public_key(key: &[u8]) -> Result<VerifyingKey, KeyProblem> {
    let bytes: [u8; PUBLIC_KEY_LEN] = key.try_into().map_err(|_| KeyProblem::WrongLength(key.len()))?;
    let point = canonical_point(bytes)?;
    if point.is_small_order() {
        return Err(KeyProblem::SmallOrder);
    }
    if !point.is_torsion_free() {
        return Err(KeyProblem::MixedOrder);
    }
    VerifyingKey::from_bytes(&bytes).map_err(|_| KeyProblem::NotAPoint)
}

/// Verifies `signature` on `message` by an already checked key (`check_public_key`), strictly.
pub fn verify_with(key: &VerifyingKey, message: &[u8], signature: &[u8]) -> Result<(), SignatureProblem> {
    let bytes: [u8; SIGNATURE_LEN] = signature
        .try_into()
        .map_err(|_| SignatureProblem::WrongLength(signature.len()))?;
    let mut r = [0u8; 32];
    let mut s = [0u8; 32];
    r.copy_from_slice(&bytes[..32]);
    s.copy_from_slice(&bytes[32..]);
    if Option::<Scalar>::from(Scalar::from_canonical_bytes(s)).is_none() {
        return Err(SignatureProblem::NonCanonicalS);
    }
    match canonical_point(r) {
        Err(_) => return Err(SignatureProblem::NonCanonicalR),
        Ok(point) if point.is_small_order() => return Err(SignatureProblem::SmallOrderR),
        Ok(_) => {}
    }
    key.verify_strict(message, &Signature::from_bytes(&bytes))
        .map_err(|_| SignatureProblem::Mismatch)
}

/// Verifies `signature` on `message` by the raw public key `key`: the key checked as `check_public_key`
/// does, then the signature as `verify_with` does.
pub fn verify_strict(key: &[u8], message: &[u8], signature: &[u8]) -> Result<(), SignatureProblem> {
    let key = check_public_key(key).map_err(SignatureProblem::BadKey)?;
    verify_with(&key, message, signature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use curve25519_dalek::constants::EIGHT_TORSION;
    use curve25519_dalek::edwards::EdwardsPoint;
    use ed25519_dalek::{Signer, SigningKey};

    /// p = 2^255 - 19, little-endian.
    const P: [u8; 32] = {
        let mut p = [0xffu8; 32];
        p[0] = 0xed;
        p[31] = 0x7f;
        p
    };

    fn signing_key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    /// Adds p to the 255-bit `y` of an encoding, keeping its sign bit; None when y + p does not fit.
    fn plus_p(encoding: [u8; 32]) -> Option<[u8; 32]> {
        let sign = encoding[31] & 0x80;
        let mut y = encoding;
        y[31] &= 0x7f;
        let mut out = [0u8; 32];
        let mut carry = 0u16;
        for i in 0..32 {
            let sum = u16::from(y[i]) + u16::from(P[i]) + carry;
            out[i] = sum as u8;
            carry = sum >> 8;
        }
        if carry != 0 || out[31] & 0x80 != 0 {
            return None;
        }
        out[31] |= sign;
        Some(out)
    }

    /// Every encoding of each small-order point: canonical, the sign bit flipped, and y + p.
    fn small_order_encodings() -> Vec<[u8; 32]> {
        let mut out = Vec::new();
        for point in EIGHT_TORSION {
            let canonical = point.compress().to_bytes();
            let mut flipped = canonical;
            flipped[31] ^= 0x80;
            for encoding in [canonical, flipped] {
                out.push(encoding);
                out.extend(plus_p(encoding));
            }
        }
        out
    }

    #[test]
    fn real_keys_pass() {
        for seed in 0..50u8 {
            let key = signing_key(seed).verifying_key();
            assert!(check_public_key(key.as_bytes()).is_ok(), "seed {seed}");
        }
    }

    #[test]
    fn zero_bytes_are_refused() {
        assert_eq!(check_public_key(&[0u8; 32]).unwrap_err(), KeyProblem::SmallOrder);
        assert_eq!(
            check_public_key(&[0u8; 31]).unwrap_err(),
            KeyProblem::WrongLength(31)
        );
    }

    #[test]
    fn every_small_order_encoding_is_refused() {
        let encodings = small_order_encodings();
        assert!(encodings.len() >= 16, "{}", encodings.len());
        for encoding in encodings {
            let problem = check_public_key(&encoding).unwrap_err();
            assert!(
                matches!(
                    problem,
                    KeyProblem::SmallOrder | KeyProblem::NonCanonical | KeyProblem::NotAPoint
                ),
                "{encoding:02x?}: {problem:?}"
            );
        }
    }

    #[test]
    fn mixed_order_keys_are_refused() {
        let key = signing_key(7).verifying_key();
        let point = CompressedEdwardsY(key.to_bytes()).decompress().unwrap();
        for torsion in &EIGHT_TORSION[1..] {
            let mixed: EdwardsPoint = point + torsion;
            assert_eq!(
                check_public_key(mixed.compress().as_bytes()).unwrap_err(),
                KeyProblem::MixedOrder
            );
        }
    }

    #[test]
    fn non_canonical_key_encodings_are_refused() {
        // y + p fits in 255 bits only for y < 19: every such y that is a curve point has a second encoding,
        // and the sign bit set on a point with x = 0 (y = 1 or p - 1) is a "negative zero".
        let mut second_encodings = 0;
        for y in 0..19u8 {
            let mut canonical = [0u8; 32];
            canonical[0] = y;
            for sign in [0u8, 0x80] {
                canonical[31] = sign;
                if CompressedEdwardsY(canonical).decompress().is_some() {
                    let other = plus_p(canonical).unwrap();
                    assert_eq!(check_public_key(&other).unwrap_err(), KeyProblem::NonCanonical);
                    second_encodings += 1;
                }
            }
        }
        assert!(second_encodings > 4, "{second_encodings}");
        let mut negative_zero_identity = [0u8; 32];
        negative_zero_identity[0] = 1;
        negative_zero_identity[31] = 0x80;
        assert_eq!(
            check_public_key(&negative_zero_identity).unwrap_err(),
            KeyProblem::NonCanonical
        );
    }

    #[test]
    fn a_real_signature_verifies_and_any_change_does_not() {
        let signer = signing_key(3);
        let key = signer.verifying_key();
        let signature = signer.sign(b"hello").to_bytes();
        assert_eq!(verify_strict(key.as_bytes(), b"hello", &signature), Ok(()));
        assert_eq!(
            verify_strict(key.as_bytes(), b"hellO", &signature),
            Err(SignatureProblem::Mismatch)
        );
        let mut bent = signature;
        bent[5] ^= 1;
        assert!(verify_strict(key.as_bytes(), b"hello", &bent).is_err());
        assert_eq!(
            verify_strict(key.as_bytes(), b"hello", &signature[..63]),
            Err(SignatureProblem::WrongLength(63))
        );
    }

    /// The forgery of the weak-key issue: R = identity, s = 0, against every small-order key encoding.
    #[test]
    fn identity_r_zero_s_forgeries_are_refused() {
        let mut forged = [0u8; 64];
        forged[0] = 1; // R = identity (y = 1), s = 0
        for encoding in small_order_encodings() {
            for n in 0..10_000u32 {
                let message = n.to_le_bytes();
                assert!(verify_strict(&encoding, &message, &forged).is_err());
            }
        }
    }

    #[test]
    fn non_canonical_s_is_refused() {
        // s + L is a second encoding of the same s: valid for lax verifiers, refused here.
        const L: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let signer = signing_key(9);
        for n in 0..64u32 {
            let message = n.to_le_bytes();
            let mut signature = signer.sign(&message).to_bytes();
            let mut carry = 0u16;
            for i in 0..32 {
                let sum = u16::from(signature[32 + i]) + u16::from(L[i]) + carry;
                signature[32 + i] = sum as u8;
                carry = sum >> 8;
            }
            if carry == 0 {
                assert_eq!(
                    verify_strict(signer.verifying_key().as_bytes(), &message, &signature),
                    Err(SignatureProblem::NonCanonicalS)
                );
            }
        }
        let mut top = signer.sign(b"x").to_bytes();
        top[63] = 0xff;
        assert_eq!(
            verify_strict(signer.verifying_key().as_bytes(), b"x", &top),
            Err(SignatureProblem::NonCanonicalS)
        );
    }

    #[test]
    fn small_order_and_non_canonical_r_are_refused() {
        let signer = signing_key(11);
        let key = signer.verifying_key();
        let signature = signer.sign(b"m").to_bytes();
        for encoding in small_order_encodings() {
            let mut forged = signature;
            forged[..32].copy_from_slice(&encoding);
            let problem = verify_strict(key.as_bytes(), b"m", &forged).unwrap_err();
            assert!(
                matches!(
                    problem,
                    SignatureProblem::SmallOrderR | SignatureProblem::NonCanonicalR
                ),
                "{problem:?}"
            );
        }
        let mut negative_r = signature;
        negative_r[31] ^= 0x80; // -R: a valid point, but the signature no longer matches
        assert!(verify_strict(key.as_bytes(), b"m", &negative_r).is_err());
    }
}
