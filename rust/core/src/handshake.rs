//! The connection handshake, version 3: who is talking, proven before any frame is taken.
//!
//! Every message starts with the magic `b"VPNP"`, the protocol version and a kind byte, so that a peer of
//! another version, or something that is not a vpn-packet node at all, is told apart at once:
//!
//! ```text
//! challenge  server -> client, first:  "VPNP" | 3 | 'C' | nonce (32 bytes, random)
//! hello      client -> server:         "VPNP" | 3 | 'H' | epoch (8, big-endian) | L (1) | id (L bytes, UTF-8)
//!                                      | K (1: 0 or 32) | public key (K) | S (1: 0 or 64) | signature (S)
//! answer     server -> client:         "VPNP" | 3 | 'A' | code (1) | L (1) | text (L bytes, UTF-8)
//! ```
//!
//! With keys, the client signs [`hello_transcript`] (the nonce, the server's public key as the client
//! verified it in TLS, its epoch, id and public key) with Ed25519; without keys (a CA-verified client
//! certificate, or an insecure node) K and S are 0. The answer's code is [`Answer`]: 0 accepts (the text is
//! the server's own id), anything else refuses with a reason (the text says more, for the logs). After an
//! accepting answer the client sends frames ([`crate::framing`]).
//!
//! Version 3 changed the frames, not these messages: a length prefix of 0 is a keepalive and bit 31 marks an
//! offload frame (a TUN super-packet with its virtio_net_hdr). A version 2 peer would take both for protocol
//! errors, so the version says it: version 2 peers are answered `unsupported_version`.
//!
//! This module is the protocol core only (no I/O, no crypto): encoders, incremental parsers that say how
//! many more bytes they need, and the exact bytes a signature covers. A parse never panics.

use std::fmt;

/// The first bytes of every handshake message.
pub const MAGIC: &[u8; 4] = b"VPNP";
/// The handshake and wire protocol version this build speaks.
pub const PROTOCOL_VERSION: u8 = 3;
/// Key and signature sizes: Ed25519's (`crate::ed25519`, which also says which keys and signatures count).
pub use crate::ed25519::{PUBLIC_KEY_LEN, SIGNATURE_LEN};
/// Bytes before a message's body: magic, version, kind.
pub const HEADER_LEN: usize = 6;
/// Bytes of the server's random challenge.
pub const NONCE_LEN: usize = 32;
/// Bytes of a challenge message.
pub const CHALLENGE_LEN: usize = HEADER_LEN + NONCE_LEN;
/// The longest peer id, in bytes.
pub const MAX_PEER_ID_LEN: usize = 255;
/// The longest hello.
pub const MAX_HELLO_LEN: usize =
    HEADER_LEN + 8 + 1 + MAX_PEER_ID_LEN + 1 + PUBLIC_KEY_LEN + 1 + SIGNATURE_LEN;
/// The longest answer.
pub const MAX_ANSWER_LEN: usize = HEADER_LEN + 2 + 255;

const KIND_CHALLENGE: u8 = b'C';
const KIND_HELLO: u8 = b'H';
const KIND_ANSWER: u8 = b'A';
const TRANSCRIPT_CONTEXT: &[u8] = b"vpn-packet hello v2\0";

/// The server's verdict on a hello. The code is on the wire; the name is what logs and counters use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Answer {
    Accepted = 0,
    /// No configured peer has this public key (or, without keys, this id).
    UnknownPeer = 1,
    /// The id is a configured peer's, but the key proven is not the one configured for it.
    KeyMismatch = 2,
    /// The signature does not verify with the key in the hello.
    BadSignature = 3,
    /// The hello's protocol version is not this node's.
    UnsupportedVersion = 4,
    /// The node is at its connection limit.
    TooManyConnections = 5,
    /// The CA-verified certificate does not name the id claimed (or names another peer too).
    IdentityMismatch = 6,
    /// The node is stopping.
    ShuttingDown = 7,
    /// The node authenticates peers by key and the hello carries none.
    KeyRequired = 8,
    /// The hello is malformed.
    BadHello = 9,
    /// The hello's public key is no key this project trusts (small order, mixed order, non-canonical:
    /// `crate::ed25519::check_public_key`).
    BadKey = 10,
}

impl Answer {
    /// Every answer, indexed by its code.
    pub const ALL: [Answer; 11] = [
        Answer::Accepted,
        Answer::UnknownPeer,
        Answer::KeyMismatch,
        Answer::BadSignature,
        Answer::UnsupportedVersion,
        Answer::TooManyConnections,
        Answer::IdentityMismatch,
        Answer::ShuttingDown,
        Answer::KeyRequired,
        Answer::BadHello,
        Answer::BadKey,
    ];

    /// The answer of a wire code, None for a code this version does not know.
    pub fn from_code(code: u8) -> Option<Answer> {
        Answer::ALL.get(usize::from(code)).copied()
    }

    /// A short stable name, for counters and logs.
    pub fn reason(self) -> &'static str {
        match self {
            Answer::Accepted => "accepted",
            Answer::UnknownPeer => "unknown_peer",
            Answer::KeyMismatch => "key_mismatch",
            Answer::BadSignature => "bad_signature",
            Answer::UnsupportedVersion => "unsupported_version",
            Answer::TooManyConnections => "too_many_connections",
            Answer::IdentityMismatch => "identity_mismatch",
            Answer::ShuttingDown => "shutting_down",
            Answer::KeyRequired => "key_required",
            Answer::BadHello => "bad_hello",
            Answer::BadKey => "bad_key",
        }
    }
}

/// Bytes that are not a valid handshake message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// Not `b"VPNP"`: not a vpn-packet peer (`tls` when the bytes look like a TLS record).
    BadMagic {
        tls: bool,
    },
    /// Another protocol version.
    UnsupportedVersion(u8),
    /// A message of another kind than expected at this point (e.g. a hello where a challenge belongs).
    UnexpectedKind {
        expected: u8,
        got: u8,
    },
    EmptyPeerId,
    PeerIdTooLong(usize),
    InvalidUtf8,
    /// A public key or signature length other than 0 or the algorithm's.
    BadFieldLength {
        field: &'static str,
        len: usize,
    },
}

impl HandshakeError {
    /// A short stable name, for counting.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::BadMagic { tls: true } => "tls_expected_plaintext",
            HandshakeError::BadMagic { tls: false } => "bad_magic",
            HandshakeError::UnsupportedVersion(_) => "unsupported_version",
            HandshakeError::UnexpectedKind { .. } => "unexpected_message",
            HandshakeError::EmptyPeerId => "empty_peer_id",
            HandshakeError::PeerIdTooLong(_) => "peer_id_too_long",
            HandshakeError::InvalidUtf8 => "invalid_utf8",
            HandshakeError::BadFieldLength { .. } => "bad_field_length",
        }
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::BadMagic { tls: true } => write!(
                f,
                "the peer speaks TLS and this side expected a plaintext handshake (one side is insecure)"
            ),
            HandshakeError::BadMagic { tls: false } => {
                write!(f, "not a vpn-packet handshake (does not start with b\"VPNP\")")
            }
            HandshakeError::UnsupportedVersion(v) => write!(
                f,
                "protocol version {v} is not supported (this node speaks version {PROTOCOL_VERSION})"
            ),
            HandshakeError::UnexpectedKind { expected, got } => write!(
                f,
                "expected a {} message, got {}",
                kind_name(*expected),
                kind_name(*got)
            ),
            HandshakeError::EmptyPeerId => write!(f, "the peer id is empty"),
            HandshakeError::PeerIdTooLong(n) => {
                write!(f, "the peer id is {n} bytes long, at most {MAX_PEER_ID_LEN} fit")
            }
            HandshakeError::InvalidUtf8 => write!(f, "a text field is not valid UTF-8"),
            HandshakeError::BadFieldLength { field, len } => {
                write!(f, "{field} of {len} bytes (expected 0 or the algorithm's length)")
            }
        }
    }
}

impl std::error::Error for HandshakeError {}

fn kind_name(kind: u8) -> String {
    match kind {
        KIND_CHALLENGE => "challenge".into(),
        KIND_HELLO => "hello".into(),
        KIND_ANSWER => "answer".into(),
        other => format!("an unknown kind (byte {other})"),
    }
}

/// Progress of an incremental parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    /// The bytes so far are a valid beginning; at least `needed` more bytes are required.
    NeedMore { needed: usize },
    /// A complete message of `consumed` bytes; what follows belongs to the next message.
    Done { message: T, consumed: usize },
}

/// A client's hello, borrowed from the bytes it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello<'a> {
    pub peer_id: &'a str,
    pub epoch: u64,
    pub public_key: Option<&'a [u8]>,
    pub signature: Option<&'a [u8]>,
}

fn header(out: &mut Vec<u8>, kind: u8) {
    out.extend_from_slice(MAGIC);
    out.push(PROTOCOL_VERSION);
    out.push(kind);
}

/// Checks the header as far as `buf` goes; `Ok(false)` while fewer than [`HEADER_LEN`] bytes are there.
fn check_header(buf: &[u8], kind: u8) -> Result<bool, HandshakeError> {
    let seen = buf.len().min(MAGIC.len());
    if buf[..seen] != MAGIC[..seen] {
        // A TLS record starts with content type 22 (handshake) and major version 3.
        let tls = buf.first() == Some(&0x16) && buf.get(1).map_or(true, |&major| major == 3);
        return Err(HandshakeError::BadMagic { tls });
    }
    if let Some(&version) = buf.get(4) {
        if version != PROTOCOL_VERSION {
            return Err(HandshakeError::UnsupportedVersion(version));
        }
    }
    match buf.get(5) {
        None => Ok(false),
        Some(&got) if got == kind => Ok(true),
        Some(&got) => Err(HandshakeError::UnexpectedKind { expected: kind, got }),
    }
}

/// While the header is incomplete, ask for the rest of the header only: the header alone decides whether
/// the bytes are this protocol and version, so a short message of another version (a v1 hello is 7 bytes and
/// up) is answered at once instead of waiting for bytes that will never come.
fn header_needed<T>(buf: &[u8]) -> Parsed<T> {
    Parsed::NeedMore {
        needed: HEADER_LEN - buf.len(),
    }
}

fn need(buf: &[u8], total: usize) -> Option<usize> {
    (buf.len() < total).then(|| total - buf.len())
}

/// The challenge carrying `nonce`.
pub fn encode_challenge(nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHALLENGE_LEN);
    header(&mut out, KIND_CHALLENGE);
    out.extend_from_slice(nonce);
    out
}

/// Parses a challenge from the start of `buf`.
pub fn parse_challenge(buf: &[u8]) -> Result<Parsed<[u8; NONCE_LEN]>, HandshakeError> {
    if !check_header(buf, KIND_CHALLENGE)? {
        return Ok(header_needed(buf));
    }
    if let Some(needed) = need(buf, CHALLENGE_LEN) {
        return Ok(Parsed::NeedMore { needed });
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&buf[HEADER_LEN..CHALLENGE_LEN]);
    Ok(Parsed::Done {
        message: nonce,
        consumed: CHALLENGE_LEN,
    })
}

fn check_peer_id(peer_id: &str) -> Result<(), HandshakeError> {
    match peer_id.len() {
        0 => Err(HandshakeError::EmptyPeerId),
        n if n > MAX_PEER_ID_LEN => Err(HandshakeError::PeerIdTooLong(n)),
        _ => Ok(()),
    }
}

fn check_optional(field: &'static str, value: Option<&[u8]>, len: usize) -> Result<(), HandshakeError> {
    match value {
        Some(v) if v.len() != len => Err(HandshakeError::BadFieldLength { field, len: v.len() }),
        _ => Ok(()),
    }
}

/// The hello of `hello.peer_id` (1..=255 bytes), with its epoch and, with keys, public key and signature.
pub fn encode_hello(hello: &Hello<'_>) -> Result<Vec<u8>, HandshakeError> {
    check_peer_id(hello.peer_id)?;
    check_optional("public key", hello.public_key, PUBLIC_KEY_LEN)?;
    check_optional("signature", hello.signature, SIGNATURE_LEN)?;
    let mut out = Vec::with_capacity(MAX_HELLO_LEN);
    header(&mut out, KIND_HELLO);
    out.extend_from_slice(&hello.epoch.to_be_bytes());
    for field in [Some(hello.peer_id.as_bytes()), hello.public_key, hello.signature] {
        let field = field.unwrap_or_default();
        out.push(field.len() as u8); // checked above: every field fits in a byte
        out.extend_from_slice(field);
    }
    Ok(out)
}

/// Reads the length-prefixed field at `at`: Ok(Err(needed)) while incomplete.
fn field(buf: &[u8], at: usize) -> Result<(&[u8], usize), usize> {
    let Some(&len) = buf.get(at) else {
        return Err(at + 1 - buf.len());
    };
    let end = at + 1 + usize::from(len);
    match need(buf, end) {
        Some(needed) => Err(needed),
        None => Ok((&buf[at + 1..end], end)),
    }
}

fn check_length_byte(buf: &[u8], at: usize, field: &'static str, len: usize) -> Result<(), HandshakeError> {
    match buf.get(at) {
        Some(&n) if n != 0 && usize::from(n) != len => Err(HandshakeError::BadFieldLength {
            field,
            len: usize::from(n),
        }),
        _ => Ok(()),
    }
}

/// Parses a hello from the start of `buf`, incrementally.
pub fn parse_hello(buf: &[u8]) -> Result<Parsed<Hello<'_>>, HandshakeError> {
    if !check_header(buf, KIND_HELLO)? {
        return Ok(header_needed(buf));
    }
    let id_at = HEADER_LEN + 8;
    if let Some(needed) = need(buf, id_at) {
        return Ok(Parsed::NeedMore { needed });
    }
    let mut epoch = [0u8; 8];
    epoch.copy_from_slice(&buf[HEADER_LEN..id_at]);
    let (id, key_at) = match field(buf, id_at) {
        Ok(found) => found,
        Err(needed) => return Ok(Parsed::NeedMore { needed }),
    };
    let peer_id = std::str::from_utf8(id).map_err(|_| HandshakeError::InvalidUtf8)?;
    check_peer_id(peer_id)?;
    // A key or signature length other than 0 or the algorithm's fails as soon as its byte arrives, so a
    // bad hello never makes the server wait for (or buffer) bytes it would refuse anyway.
    check_length_byte(buf, key_at, "public key", PUBLIC_KEY_LEN)?;
    let (key, sig_at) = match field(buf, key_at) {
        Ok(found) => found,
        Err(needed) => return Ok(Parsed::NeedMore { needed }),
    };
    let public_key = (!key.is_empty()).then_some(key);
    check_length_byte(buf, sig_at, "signature", SIGNATURE_LEN)?;
    let (sig, end) = match field(buf, sig_at) {
        Ok(found) => found,
        Err(needed) => return Ok(Parsed::NeedMore { needed }),
    };
    let signature = (!sig.is_empty()).then_some(sig);
    Ok(Parsed::Done {
        message: Hello {
            peer_id,
            epoch: u64::from_be_bytes(epoch),
            public_key,
            signature,
        },
        consumed: end,
    })
}

/// The exact bytes a client signs: a context string, the server's nonce and public key, then the hello's
/// epoch, id and public key. Binding the server's key makes a signature useless to any other server;
/// the nonce makes it useless on any other connection.
pub fn hello_transcript(
    nonce: &[u8; NONCE_LEN],
    server_public_key: &[u8; PUBLIC_KEY_LEN],
    peer_id: &str,
    epoch: u64,
    client_public_key: &[u8; PUBLIC_KEY_LEN],
) -> Result<Vec<u8>, HandshakeError> {
    check_peer_id(peer_id)?;
    let mut out = Vec::with_capacity(TRANSCRIPT_CONTEXT.len() + 2 * 32 + 8 + 1 + peer_id.len() + 32);
    out.extend_from_slice(TRANSCRIPT_CONTEXT);
    out.extend_from_slice(nonce);
    out.extend_from_slice(server_public_key);
    out.extend_from_slice(&epoch.to_be_bytes());
    out.push(peer_id.len() as u8);
    out.extend_from_slice(peer_id.as_bytes());
    out.extend_from_slice(client_public_key);
    Ok(out)
}

/// An answer: `code` (0 accepts) and a text of at most 255 bytes (longer text is cut at a char boundary).
pub fn encode_answer(code: u8, text: &str) -> Vec<u8> {
    let mut cut = text.len().min(255);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = Vec::with_capacity(HEADER_LEN + 2 + cut);
    header(&mut out, KIND_ANSWER);
    out.push(code);
    out.push(cut as u8);
    out.extend_from_slice(&text.as_bytes()[..cut]);
    out
}

/// Parses an answer from the start of `buf`: `(code, text)`.
pub fn parse_answer(buf: &[u8]) -> Result<Parsed<(u8, &str)>, HandshakeError> {
    if !check_header(buf, KIND_ANSWER)? {
        return Ok(header_needed(buf));
    }
    let Some(&code) = buf.get(HEADER_LEN) else {
        return Ok(Parsed::NeedMore {
            needed: HEADER_LEN + 2 - buf.len(),
        });
    };
    let (text, end) = match field(buf, HEADER_LEN + 1) {
        Ok(found) => found,
        Err(needed) => return Ok(Parsed::NeedMore { needed }),
    };
    let text = std::str::from_utf8(text).map_err(|_| HandshakeError::InvalidUtf8)?;
    Ok(Parsed::Done {
        message: (code, text),
        consumed: end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hello<'a>(id: &'a str, key: Option<&'a [u8]>, sig: Option<&'a [u8]>) -> Hello<'a> {
        Hello {
            peer_id: id,
            epoch: 0x0102_0304_0506_0708,
            public_key: key,
            signature: sig,
        }
    }

    #[test]
    fn hello_round_trip_with_and_without_keys() {
        let key = [7u8; 32];
        let sig = [9u8; 64];
        for h in [hello("node-a", Some(&key), Some(&sig)), hello("n", None, None)] {
            let wire = encode_hello(&h).unwrap();
            assert_eq!(
                parse_hello(&wire).unwrap(),
                Parsed::Done {
                    message: h.clone(),
                    consumed: wire.len()
                }
            );
            // Every proper prefix asks for more, and for no more than what is missing.
            for cut in 0..wire.len() {
                match parse_hello(&wire[..cut]).unwrap() {
                    Parsed::NeedMore { needed } => assert!(needed >= 1 && cut + needed <= wire.len()),
                    done => panic!("prefix {cut} parsed as {done:?}"),
                }
            }
        }
        assert!(encode_hello(&hello("x", None, None)).unwrap().len() <= MAX_HELLO_LEN);
    }

    #[test]
    fn challenge_and_answer_round_trip() {
        let nonce = [5u8; 32];
        let wire = encode_challenge(&nonce);
        assert_eq!(wire.len(), CHALLENGE_LEN);
        assert_eq!(
            parse_challenge(&wire).unwrap(),
            Parsed::Done {
                message: nonce,
                consumed: CHALLENGE_LEN
            }
        );
        let wire = encode_answer(2, "our key is not the one it has for node-a");
        match parse_answer(&wire).unwrap() {
            Parsed::Done { message, consumed } => {
                assert_eq!(message, (2, "our key is not the one it has for node-a"));
                assert_eq!(consumed, wire.len());
            }
            other => panic!("{other:?}"),
        }
        let long = "é".repeat(200); // 400 bytes: cut at a char boundary
        let wire = encode_answer(0, &long);
        assert!(wire.len() <= MAX_ANSWER_LEN);
        assert!(matches!(parse_answer(&wire), Ok(Parsed::Done { .. })));
    }

    #[test]
    fn errors_are_early_and_named() {
        assert_eq!(
            parse_hello(b"VPNQ").unwrap_err(),
            HandshakeError::BadMagic { tls: false }
        );
        assert_eq!(
            parse_hello(&[0x16, 3, 1]).unwrap_err().reason(),
            "tls_expected_plaintext"
        );
        assert_eq!(
            parse_hello(b"VPNP\x01\x06node-a").unwrap_err(),
            HandshakeError::UnsupportedVersion(1)
        );
        // Before the header is complete, only the header's bytes are asked for.
        assert_eq!(parse_hello(b"VP").unwrap(), Parsed::NeedMore { needed: 4 });
        assert_eq!(parse_hello(b"").unwrap(), Parsed::NeedMore { needed: HEADER_LEN });
        assert_eq!(
            parse_challenge(&encode_answer(0, "")).unwrap_err().reason(),
            "unexpected_message"
        );
        let mut bad_key = encode_hello(&hello("a", None, None)).unwrap();
        let at = HEADER_LEN + 8 + 2; // the key length byte after id "a"
        bad_key[at] = 3;
        bad_key.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(parse_hello(&bad_key).unwrap_err().reason(), "bad_field_length");
        assert_eq!(
            encode_hello(&hello("", None, None)).unwrap_err(),
            HandshakeError::EmptyPeerId
        );
        assert_eq!(Answer::from_code(2), Some(Answer::KeyMismatch));
        assert_eq!(Answer::from_code(200), None);
        for (code, answer) in Answer::ALL.iter().enumerate() {
            assert_eq!(*answer as usize, code);
        }
    }

    #[test]
    fn transcript_binds_every_field() {
        let base = hello_transcript(&[1; 32], &[2; 32], "a", 3, &[4; 32]).unwrap();
        let variants = [
            hello_transcript(&[9; 32], &[2; 32], "a", 3, &[4; 32]).unwrap(),
            hello_transcript(&[1; 32], &[9; 32], "a", 3, &[4; 32]).unwrap(),
            hello_transcript(&[1; 32], &[2; 32], "b", 3, &[4; 32]).unwrap(),
            hello_transcript(&[1; 32], &[2; 32], "a", 9, &[4; 32]).unwrap(),
            hello_transcript(&[1; 32], &[2; 32], "a", 3, &[9; 32]).unwrap(),
        ];
        for v in variants {
            assert_ne!(v, base);
        }
    }

    proptest! {
        #[test]
        fn parsers_never_panic_and_stay_bounded(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            match parse_hello(&data) {
                Ok(Parsed::Done { message, consumed }) => {
                    prop_assert!(consumed <= MAX_HELLO_LEN);
                    prop_assert_eq!(encode_hello(&message).unwrap(), &data[..consumed]);
                }
                Ok(Parsed::NeedMore { needed }) => prop_assert!(data.len() + needed <= MAX_HELLO_LEN),
                Err(_) => {}
            }
            let _ = parse_challenge(&data);
            let _ = parse_answer(&data);
        }

        #[test]
        fn hello_prefixes_never_ask_past_the_bound(
            head in proptest::collection::vec(any::<u8>(), 0..8), id_len in 1u8..=255, key_len: u8
        ) {
            // A valid header, then arbitrary epoch bytes, an id of id_len bytes and a key length byte.
            let mut data = b"VPNP\x03H".to_vec();
            data.extend(head.iter().chain(std::iter::repeat(&0u8)).take(8));
            data.push(id_len);
            data.extend(std::iter::repeat(b'a').take(usize::from(id_len)));
            data.push(key_len);
            match parse_hello(&data) {
                Ok(Parsed::NeedMore { needed }) => prop_assert!(data.len() + needed <= MAX_HELLO_LEN),
                Ok(Parsed::Done { .. }) => {}
                Err(err) => prop_assert_eq!(err.reason(), "bad_field_length"),
            }
        }

        #[test]
        fn hello_parses_after_any_valid_prefix(id in "[a-z0-9.-]{1,40}", epoch: u64, with_key: bool) {
            let key = [1u8; 32];
            let sig = [2u8; 64];
            let h = Hello {
                peer_id: &id,
                epoch,
                public_key: with_key.then_some(&key[..]),
                signature: with_key.then_some(&sig[..]),
            };
            let mut wire = encode_hello(&h).unwrap();
            let len = wire.len();
            wire.extend_from_slice(b"\0\0\0\x01x"); // a frame follows
            prop_assert_eq!(parse_hello(&wire).unwrap(), Parsed::Done { message: h, consumed: len });
        }
    }
}
