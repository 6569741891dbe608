//! One node-to-node connection as a state machine without I/O: TLS bytes in, typed results out (issue 20,
//! item 2), the way boringtun's `Tunn` is a WireGuard peer without sockets.
//!
//! ```text
//! client (sends frames)                           server (takes frames, sends acks)
//!   TLS 1.3 handshake (crate::tls)      <---->      TLS 1.3 handshake
//!                                        <----      challenge (nonce)
//!   hello (id, epoch, key, signature)    ---->      judged: the peer is who its key proves
//!                                        <----      answer (accepted, or a refusal with its reason)
//!   frames (crate::framing)              ---->      handed to a sink, counted
//!                                        <----      acks (crate::ack): one per receive call
//! ```
//!
//! An insecure node (`[node] insecure = true`, [`crate::tls::Trust::Insecure`]) runs the same machine
//! without TLS: the bytes pass through unchanged (the server's challenge is in the output at once, as the
//! server speaks first), and every stage after TLS, every check and every counter is the one above; the
//! hello carries no key, and a peer is the configured id it claims. The wire is version 3's, as before.
//!
//! The caller owns the socket: it passes what it read to [`Connection::receive`] (server: with a sink for
//! the frames), writes what [`Connection::output`] holds, and learns what happened from the returned
//! [`Event`]s (established, refused, failed, closed) and the counters. On the fast path a call returns no
//! event: frames go to the sink and the counts move. Any read boundaries give the same result.
//!
//! Bad input ends only its own connection, with a reason ([`Failure::reason`], counted by the caller, see
//! [`FailureTally`]): malformed TLS records, a malformed handshake message, a bad frame length, an offload
//! frame whose virtio_net_hdr cannot be honoured ([`crate::gso::validate`]), an ack stream that contradicts
//! itself. The connection then queues a TLS alert or close_notify and takes nothing more.
//!
//! Memory per connection is bounded. rustls reads 4 KiB at a time and holds at most one TLS record
//! (18.4 KiB with its header and slack), or, while it joins a handshake message before authentication, at
//! most 64 KiB; the plaintext of each read is handed on before the next. Beyond that: a handshake message
//! in progress (at most [`crate::handshake::MAX_HELLO_LEN`] bytes), one partial frame (at most
//! `4 + max(max_frame_size, 10 + 65535)` bytes), one partial ack record (8 bytes), and the output: at most
//! [`MAX_OUTPUT`] + one frame + TLS overhead (about 0.2%), because [`Connection::send_packets`] stops
//! taking packets at [`MAX_OUTPUT`] until the caller has written. With the default frame size that is
//! under 420 KiB per connection, most of it only while output waits for a slow socket. There is no clock
//! here: the time bounds (handshake timeout, idle timeout) are the caller's, as the I/O is.
//!
//! Where it runs: a receiver's connections (TLS and plaintext) are server `Connection`s inside
//! [`crate::receive`] (one native call per socket readiness event, from the socket to the TUN); a sender's
//! are client `Connection`s inside [`crate::send`] (`transport/tcp.py`'s `TcpStream`: a framed batch
//! encrypted and written in the call that hands it over, acks read once per readiness event). What remains of issue 20's item 3 is the
//! TUN readiness path: reading, routing and sending in one native call, without the dispatcher's Python
//! worker between the TUN and the session.

use std::fmt;

use rustls::{ClientConnection, Error as TlsError, ServerConnection};

use crate::ack::{encode_ack, AckDecoder, AckError};
use crate::framing::{
    encode_frames_into, encode_offload_frame_into, FrameDecoder, FrameKind, FramingError, KEEPALIVE,
    LENGTH_PREFIX_LEN, MAX_OFFLOAD_FRAME, OFFLOAD_FLAG, VNET_HDR_LEN,
};
use crate::gso::{self, GsoError};
use crate::handshake::{self, Answer, HandshakeError, Hello, Parsed, NONCE_LEN};
use crate::key_checks::{accept_public_key, verify_signature};
use crate::tls::{certificate_names, placeholder_server_name, refusal_of, ConfigError, Security, Trust};

/// The largest packet frame length a prefix can say (bit 31 marks offload frames).
const MAX_FRAME_LEN: usize = (OFFLOAD_FLAG - 1) as usize;

/// Bytes of ciphertext [`Connection::send_packets`] lets wait in the output before it stops taking packets.
pub const MAX_OUTPUT: usize = 256 * 1024;

/// A connection's end: what ended it, by a stable reason.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// rustls refused what the peer sent (a malformed or undecryptable record, a TLS alert, an incompatible
    /// or misbehaving peer).
    Tls(TlsError),
    /// A verifier of ours refused the peer's certificate: `key_mismatch`, `identity_mismatch`,
    /// `no_ed25519_key`, `weak_key`.
    Certificate { reason: &'static str, detail: String },
    /// Bytes that are not the handshake message expected (another version, not this protocol, malformed).
    Handshake(HandshakeError),
    /// A frame length that cannot be honoured.
    Framing(FramingError),
    /// An offload frame whose virtio_net_hdr cannot be honoured.
    Offload(GsoError),
    /// An ack stream that contradicts itself.
    Ack(AckError),
    /// An ack for more frames than were sent.
    AckBeyondSent { acked: u64, sent: u64 },
    /// Bytes where the protocol has none (the client sent after its hello, before the answer).
    UnexpectedData,
    /// The peer closed (or the stream ended) before the handshake was done.
    ClosedEarly,
}

impl Failure {
    /// Every reason [`Failure::reason`] can return (for registering counters up front).
    pub const REASONS: [&'static str; 28] = [
        "tls_bad_record",
        "tls_alert",
        "tls_certificate",
        "tls_no_certificate",
        "tls_incompatible",
        "tls_misbehaved",
        "tls_error",
        "key_mismatch",
        "identity_mismatch",
        "no_ed25519_key",
        "weak_key",
        "bad_magic",
        "tls_expected_plaintext",
        "unsupported_version",
        "unexpected_message",
        "empty_peer_id",
        "peer_id_too_long",
        "invalid_utf8",
        "bad_field_length",
        "zero_length",
        "too_large",
        "short_offload",
        "offload_invalid",
        "ack_unexpected",
        "ack_regressed",
        "ack_beyond_sent",
        "unexpected_data",
        "closed_early",
    ];

    /// A short stable name, for counting.
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::Tls(err) => tls_reason(err),
            Failure::Certificate { reason, .. } => reason,
            // The handshake error's own reason (a malformed hello says how), in plaintext and TLS alike.
            Failure::Handshake(err) => err.reason(),
            Failure::Framing(err) => err.reason(),
            Failure::Offload(_) => "offload_invalid",
            Failure::Ack(AckError::UnexpectedKind(_)) => "ack_unexpected",
            Failure::Ack(AckError::Regressed { .. }) => "ack_regressed",
            Failure::AckBeyondSent { .. } => "ack_beyond_sent",
            Failure::UnexpectedData => "unexpected_data",
            Failure::ClosedEarly => "closed_early",
        }
    }
}

fn tls_reason(err: &TlsError) -> &'static str {
    if let Some(refusal) = refusal_of(err) {
        return refusal.reason;
    }
    match err {
        TlsError::InvalidMessage(_)
        | TlsError::DecryptError
        | TlsError::PeerSentOversizedRecord
        | TlsError::InappropriateMessage { .. }
        | TlsError::InappropriateHandshakeMessage { .. } => "tls_bad_record",
        TlsError::AlertReceived(_) => "tls_alert",
        TlsError::InvalidCertificate(_) => "tls_certificate",
        TlsError::NoCertificatesPresented => "tls_no_certificate",
        TlsError::PeerIncompatible(_) => "tls_incompatible",
        TlsError::PeerMisbehaved(_) => "tls_misbehaved",
        _ => "tls_error",
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Tls(err) => match refusal_of(err) {
                Some(refusal) => write!(f, "{}", refusal.detail),
                None => write!(f, "TLS: {err}"),
            },
            Failure::Certificate { detail, .. } => f.write_str(detail),
            Failure::Handshake(err) => write!(f, "handshake: {err}"),
            Failure::Framing(err) => write!(f, "framing: {err}"),
            Failure::Offload(err) => write!(f, "offload frame: {err}"),
            Failure::Ack(err) => write!(f, "acks: {err}"),
            Failure::AckBeyondSent { acked, sent } => {
                write!(f, "the peer acknowledged {acked} frames of the {sent} sent")
            }
            Failure::UnexpectedData => write!(f, "bytes where the protocol has none"),
            Failure::ClosedEarly => write!(f, "the connection closed before the handshake was done"),
        }
    }
}

impl std::error::Error for Failure {}

/// Failures counted by reason, across connections (what a node's counters would show).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailureTally {
    counts: [u64; Failure::REASONS.len()],
}

impl FailureTally {
    /// Counts one failure.
    pub fn record(&mut self, failure: &Failure) {
        self.record_reason(failure.reason());
    }

    fn record_reason(&mut self, reason: &str) {
        if let Some(at) = Failure::REASONS.iter().position(|r| *r == reason) {
            self.counts[at] += 1;
        }
    }

    /// The count of `reason`.
    pub fn get(&self, reason: &str) -> u64 {
        Failure::REASONS
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |at| self.counts[at])
    }

    /// Every reason with a count above zero.
    pub fn nonzero(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Failure::REASONS
            .iter()
            .zip(self.counts)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (*r, n))
    }
}

/// A lifecycle event; the fast path has none.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The handshake is done. `peer_id`: the configured peer (client: the one dialled; server: the one the
    /// key or certificate proved); `announced_id`: the id the other side announced (the server's answer
    /// text, or the hello's id, a label only in key mode); `epoch`: the hello's connection epoch.
    Established {
        peer_id: String,
        announced_id: String,
        epoch: u64,
    },
    /// The server refused the client: on the client, the server's reason; on the server, the reason it
    /// answered. `code` is the wire code, `reason` its name ([`Answer::reason`], or `refused_<code>` for a
    /// code this build does not know), `text` the server's explanation.
    /// `claimed`: on the server, the id the refused hello announced (empty when no hello was judged); on
    /// the client, empty.
    Refused {
        code: u8,
        reason: String,
        text: String,
        claimed: String,
    },
    /// The connection failed; see [`Failure`].
    Failed(Failure),
    /// The peer closed an established connection (close_notify).
    Closed,
}

/// Why [`Connection::send_packets`] took nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The handshake is not done (or this is a server, which sends acks only).
    NotEstablished,
    /// The connection is closed or failed.
    Closed,
    /// A packet frames cannot carry (empty, or above the maximum frame size); the packets before it were
    /// taken (the count says how many).
    Framing { taken: usize, error: FramingError },
    /// Framed bytes ([`Connection::send_framed`]) that are not whole frames: a length prefix the receiver
    /// refuses, or a buffer that ends inside a frame (at byte `at`). Nothing was taken.
    Unframed { at: usize, error: Option<FramingError> },
    /// Framed bytes holding another number of frames than the caller counted (its receipt would be
    /// wrong). Nothing was taken.
    Miscounted { framed: u64, expected: u64 },
}

impl SendError {
    /// A short stable name, for counting: `not_established`, `closed`, a [`FramingError`]'s reason,
    /// `truncated` (bytes ending inside a frame), `miscounted`.
    pub fn reason(&self) -> &'static str {
        match self {
            SendError::NotEstablished => "not_established",
            SendError::Closed => "closed",
            SendError::Framing { error, .. }
            | SendError::Unframed {
                error: Some(error), ..
            } => error.reason(),
            SendError::Unframed { error: None, .. } => "truncated",
            SendError::Miscounted { .. } => "miscounted",
        }
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::NotEstablished => write!(f, "the connection is not established"),
            SendError::Closed => write!(f, "the connection is closed"),
            SendError::Framing { taken, error } => write!(f, "packet {taken}: {error}"),
            SendError::Unframed {
                at,
                error: Some(error),
            } => write!(f, "framed bytes at {at}: {error}"),
            SendError::Unframed { at, error: None } => {
                write!(f, "framed bytes end inside a frame (at {at})")
            }
            SendError::Miscounted { framed, expected } => {
                write!(f, "the framed bytes hold {framed} frames, not {expected}")
            }
        }
    }
}

impl std::error::Error for SendError {}

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The TLS handshake.
    Tls,
    /// Client: TLS is done, waiting for the challenge. Server: challenge sent, waiting for the hello.
    Challenge,
    /// Client: hello sent, waiting for the answer.
    Answer,
    /// Frames flow.
    Established,
    /// Closed, refused or failed: nothing more is taken.
    Closed,
}

impl Stage {
    /// The stage's name as the bindings report it.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Tls => "tls",
            Stage::Challenge => "challenge",
            Stage::Answer => "answer",
            Stage::Established => "established",
            Stage::Closed => "closed",
        }
    }
}

#[derive(Debug)]
enum Role {
    Client {
        peer_id: String,
        epoch: u64,
    },
    Server {
        nonce: [u8; NONCE_LEN],
        refuse: Option<Answer>,
    },
}

/// Counters of one connection (cumulative).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionCounts {
    /// TLS bytes received and produced.
    pub tls_bytes_in: u64,
    pub tls_bytes_out: u64,
    /// Client: frames sent (packet and offload). Server: frames taken (handed to the sink).
    pub frames: u64,
    /// Payload bytes of those frames.
    pub frame_bytes: u64,
    /// Offload frames among `frames`.
    pub offload_frames: u64,
    /// Keepalives sent (client) or received (server).
    pub keepalives: u64,
    /// Client: the highest count the server acknowledged. Server: the last count it acknowledged.
    pub acked: u64,
}

/// What carries a connection's bytes: TLS 1.3 (rustls), or, in insecure mode, nothing at all (the bytes
/// pass through unchanged). Everything after it (challenge, hello, answer, frames, acks, keepalives, the
/// end) is the same for both.
enum Transport {
    Tls(Box<rustls::Connection>),
    Plain,
}

/// What the plaintext of a read moves, apart from the transport that carried it: the stage, the message,
/// the decoders and the counts. Apart from [`Transport`] so that a read's plaintext, borrowed from rustls'
/// buffer (or, in plaintext, from the caller's), is taken without a copy ([`Flow::absorb`]).
#[derive(Debug)]
struct Flow {
    role: Role,
    stage: Stage,
    /// A handshake message being received; never more than the message's bound.
    message: Vec<u8>,
    frames: FrameDecoder,
    acks: AckDecoder,
    counts: ConnectionCounts,
    /// The configured peer, once established (what [`Connection::receive_frames`] names to its sink).
    peer_id: Option<String>,
}

/// What a [`Flow::absorb`] leaves to the connection once the plaintext it read is released (the steps
/// that write: answers, hellos, acks, alerts).
enum After {
    Nothing,
    Fail(Failure),
    HandshakeFailed(HandshakeError),
    MessageComplete,
}

impl Flow {
    /// Takes what it can of `chunk` (plaintext) without writing anything; returns the bytes it used and what
    /// is left to do.
    fn absorb(&mut self, chunk: &[u8], sink: &mut impl FnMut(&str, FrameKind, &[u8])) -> (usize, After) {
        let n = chunk.len();
        match self.stage {
            Stage::Established if !matches!(self.role, Role::Client { .. }) => {
                let mut bad_offload = None;
                let counts = &mut self.counts;
                let peer_id = self.peer_id.as_deref().unwrap_or_default();
                let keepalives_before = self.frames.keepalives();
                let result = self.frames.feed_frames(chunk, |kind, payload| {
                    if bad_offload.is_some() {
                        return;
                    }
                    if kind == FrameKind::Offload {
                        let (header, packet) = payload.split_at(VNET_HDR_LEN);
                        let checked =
                            gso::VirtioNetHdr::parse(header).and_then(|hdr| gso::validate(&hdr, packet));
                        if let Err(err) = checked {
                            bad_offload = Some(err);
                            return;
                        }
                        counts.offload_frames += 1;
                    }
                    counts.frames += 1;
                    counts.frame_bytes += payload.len() as u64;
                    sink(peer_id, kind, payload);
                });
                counts.keepalives += self.frames.keepalives() - keepalives_before;
                let after = if let Some(err) = bad_offload {
                    After::Fail(Failure::Offload(err))
                } else if let Err(err) = result {
                    After::Fail(Failure::Framing(err))
                } else {
                    After::Nothing
                };
                (n, after)
            }
            Stage::Established => {
                let after = match self.acks.feed(chunk) {
                    Ok(taken) if taken > self.counts.frames => After::Fail(Failure::AckBeyondSent {
                        acked: taken,
                        sent: self.counts.frames,
                    }),
                    Ok(taken) => {
                        self.counts.acked = taken;
                        After::Nothing
                    }
                    Err(err) => After::Fail(Failure::Ack(err)),
                };
                (n, after)
            }
            Stage::Tls | Stage::Challenge | Stage::Answer => {
                // A handshake message: take exactly the bytes it still needs, never past its end.
                let needed = match self.parse_message() {
                    Ok(Some(needed)) => needed,
                    // The client sent before the answer (or the server before the hello): the protocol
                    // has no such bytes.
                    Ok(None) => return (0, After::Fail(Failure::UnexpectedData)),
                    Err(err) => return (0, After::HandshakeFailed(err)),
                };
                let take = needed.min(n);
                self.message.extend_from_slice(&chunk[..take]);
                let after = match self.parse_message() {
                    Ok(Some(_)) => After::Nothing,
                    Ok(None) => After::MessageComplete,
                    Err(err) => After::HandshakeFailed(err),
                };
                (take, after)
            }
            // What follows an end (bytes after a refusal, after a failure) is ignored.
            Stage::Closed => (n, After::Nothing),
        }
    }

    /// `Ok(Some(needed))` while the message is incomplete, `Ok(None)` when it is complete (or when no
    /// message belongs here), or the error of bytes that cannot be it.
    fn parse_message(&self) -> Result<Option<usize>, HandshakeError> {
        fn progress<T>(parsed: Parsed<T>) -> Option<usize> {
            match parsed {
                Parsed::NeedMore { needed } => Some(needed),
                Parsed::Done { .. } => None,
            }
        }
        let buf = &self.message;
        match (&self.role, self.stage) {
            (Role::Client { .. }, Stage::Tls | Stage::Challenge) => {
                Ok(progress(handshake::parse_challenge(buf)?))
            }
            (Role::Client { .. }, Stage::Answer) => Ok(progress(handshake::parse_answer(buf)?)),
            (Role::Server { .. }, Stage::Challenge) => Ok(progress(handshake::parse_hello(buf)?)),
            _ => Ok(None),
        }
    }
}

/// One connection; see the module documentation.
pub struct Connection {
    transport: Transport,
    security: Security,
    flow: Flow,
    out: Vec<u8>,
    scratch: Vec<u8>,
    failure: Option<Failure>,
    /// rustls refused a record: its alert is queued, and it sends nothing more.
    refused: bool,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("role", &self.flow.role)
            .field("stage", &self.flow.stage)
            .field("encrypted", &matches!(self.transport, Transport::Tls(_)))
            .field("counts", &self.flow.counts)
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// A client dialling `peer_id`, announcing `epoch` (later connections of this node have larger ones).
    /// With TLS its ClientHello is in the output; in plaintext it waits for the server's challenge.
    pub fn client(security: &Security, peer_id: &str, epoch: u64) -> Result<Connection, ConfigError> {
        let role = Role::Client {
            peer_id: peer_id.to_owned(),
            epoch,
        };
        if !security.encrypted() {
            let mut conn = Connection::new(Transport::Plain, security, role);
            conn.flow.stage = Stage::Challenge;
            return Ok(conn);
        }
        let config = security.client_config(peer_id)?;
        let tls = ClientConnection::new(config, placeholder_server_name()).map_err(|err| ConfigError {
            reason: "tls",
            detail: err.to_string(),
        })?;
        let mut conn = Connection::new(Transport::Tls(Box::new(tls.into())), security, role);
        conn.flush();
        Ok(conn)
    }

    /// A server for one accepted connection, with a fresh random challenge. `refuse` answers every hello
    /// with that reason (`too_many_connections`, `shutting_down`), so the client learns why.
    pub fn server(security: &Security, refuse: Option<Answer>) -> Result<Connection, ConfigError> {
        let mut nonce = [0u8; NONCE_LEN];
        crate::tls::provider()
            .secure_random
            .fill(&mut nonce)
            .map_err(|err| ConfigError {
                reason: "tls",
                detail: format!("no random bytes for the challenge: {err:?}"),
            })?;
        Self::server_with_nonce(security, refuse, nonce)
    }

    /// [`Connection::server`] with a given challenge (tests: reproducible transcripts). In plaintext the
    /// challenge is in the output at once (the server speaks first).
    pub fn server_with_nonce(
        security: &Security,
        refuse: Option<Answer>,
        nonce: [u8; NONCE_LEN],
    ) -> Result<Connection, ConfigError> {
        let role = Role::Server { nonce, refuse };
        if !security.encrypted() {
            let mut conn = Connection::new(Transport::Plain, security, role);
            conn.tls_done();
            return Ok(conn);
        }
        let tls = ServerConnection::new(security.server_config()?).map_err(|err| ConfigError {
            reason: "tls",
            detail: err.to_string(),
        })?;
        Ok(Connection::new(
            Transport::Tls(Box::new(tls.into())),
            security,
            role,
        ))
    }

    fn new(mut transport: Transport, security: &Security, role: Role) -> Connection {
        if let Transport::Tls(tls) = &mut transport {
            // rustls stops taking plaintext once 64 KiB of records wait (its default), and a write past
            // that would be cut short; the records go to `out` at every `flush`, whose size the callers
            // bound.
            tls.set_buffer_limit(None);
        }
        Connection {
            transport,
            security: security.clone(),
            flow: Flow {
                role,
                stage: Stage::Tls,
                message: Vec::new(),
                frames: FrameDecoder::new(security.max_frame_size()),
                acks: AckDecoder::new(),
                counts: ConnectionCounts::default(),
                peer_id: None,
            },
            out: Vec::new(),
            scratch: Vec::new(),
            failure: None,
            refused: false,
        }
    }

    /// Whether this is the client (sending) side.
    pub fn is_client(&self) -> bool {
        matches!(self.flow.role, Role::Client { .. })
    }

    /// Whether the connection runs TLS (false: an insecure node's plaintext).
    pub fn encrypted(&self) -> bool {
        matches!(self.transport, Transport::Tls(_))
    }

    /// Where the connection stands.
    pub fn stage(&self) -> Stage {
        self.flow.stage
    }

    /// The configured peer once the handshake is done (client: the one dialled; server: the one proved).
    pub fn peer_id(&self) -> Option<&str> {
        self.flow.peer_id.as_deref()
    }

    /// The failure that ended the connection, if one did.
    pub fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }

    /// The counters.
    pub fn counts(&self) -> ConnectionCounts {
        self.flow.counts
    }

    /// Client: frames sent and not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        if self.is_client() {
            self.flow.counts.frames.saturating_sub(self.flow.counts.acked)
        } else {
            0
        }
    }

    /// The TLS key exchange group negotiated (`X25519MLKEM768`, `X25519`), once known; None in plaintext.
    pub fn key_exchange_group(&self) -> Option<String> {
        let Transport::Tls(tls) = &self.transport else {
            return None;
        };
        tls.negotiated_key_exchange_group()
            .map(|group| format!("{:?}", group.name()))
    }

    fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        match &self.transport {
            Transport::Tls(tls) => tls.peer_certificates(),
            Transport::Plain => None,
        }
    }

    /// The names the peer's certificate carries (its DNS and URI names, as [`certificate_names`] reads
    /// them), once TLS is done; empty before, and in plaintext.
    pub fn peer_names(&self) -> Vec<String> {
        self.peer_certificates()
            .and_then(|certs| certs.first())
            .map(|cert| certificate_names(cert))
            .unwrap_or_default()
    }

    /// Bytes held of a handshake message, a partial frame and a partial ack record (bounded, see the
    /// module documentation; rustls' own buffers and the output come on top).
    pub fn buffered(&self) -> usize {
        self.flow.message.len() + self.flow.frames.buffered() + self.flow.acks.buffered()
    }

    /// The bytes to write to the socket (TLS records, or plaintext).
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Marks the first `n` bytes of [`Connection::output`] as written.
    pub fn consume_output(&mut self, n: usize) {
        let n = n.min(self.out.len());
        self.out.drain(..n);
    }

    /// Takes all of [`Connection::output`].
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Plaintext to the peer: into rustls (records at the next [`Connection::flush`]), or straight into
    /// the output.
    fn write(&mut self, data: &[u8]) {
        match &mut self.transport {
            // Writing plaintext into rustls cannot fail after the handshake (it buffers without a limit,
            // and the callers bound what they send).
            Transport::Tls(tls) => {
                let _ = std::io::Write::write_all(&mut tls.writer(), data);
            }
            Transport::Plain => {
                self.out.extend_from_slice(data);
                self.flow.counts.tls_bytes_out += data.len() as u64;
            }
        }
    }

    fn flush(&mut self) {
        let Transport::Tls(tls) = &mut self.transport else {
            return; // plaintext is in the output already
        };
        while tls.wants_write() {
            match tls.write_tls(&mut self.out) {
                Ok(0) | Err(_) => break, // writing to a Vec does not fail
                Ok(n) => self.flow.counts.tls_bytes_out += n as u64,
            }
        }
    }

    /// TLS: close_notify queued. Plaintext has none: the caller's close of the socket (FIN) says it.
    fn send_close_notify(&mut self) {
        if let Transport::Tls(tls) = &mut self.transport {
            tls.send_close_notify();
        }
    }

    /// Ends the connection from this side (close_notify queued in the output).
    pub fn close(&mut self) {
        if self.flow.stage != Stage::Closed {
            self.send_close_notify();
            self.flow.stage = Stage::Closed;
            self.flush();
        }
    }

    fn fail(&mut self, failure: Failure, events: &mut Vec<Event>) {
        if self.flow.stage == Stage::Closed {
            return;
        }
        // When rustls refused a record it queued its alert and sends nothing after it (also when the
        // plaintext of the records before the bad one ended the connection first): an ack written now
        // would never reach the peer, so none is counted (`acked` is what the peer was sent; the peer
        // counts those frames lost in flight, though they were delivered). Otherwise the frames taken
        // before the failure are acknowledged (delivered, or dropped and counted), then close_notify.
        if !self.refused {
            self.send_ack();
            self.send_close_notify();
        }
        self.flow.stage = Stage::Closed;
        self.failure = Some(failure.clone());
        events.push(Event::Failed(failure));
    }

    /// The stream ended (the socket read returned 0). Before the handshake is done this is a failure
    /// (`closed_early`); after it, the end of the connection.
    pub fn receive_eof(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        match self.flow.stage {
            Stage::Closed => {}
            Stage::Established => {
                self.flow.stage = Stage::Closed;
                events.push(Event::Closed);
            }
            _ => self.fail(Failure::ClosedEarly, &mut events),
        }
        self.flush();
        events
    }

    /// Takes bytes read from the socket (TLS records, or plaintext). Frames (server) go to `sink` as
    /// `(kind, payload)` (an offload frame's payload starts with its virtio_net_hdr, checked); acks
    /// (client) move the counts. Returns the lifecycle events, usually none. After the connection closed,
    /// bytes are ignored.
    pub fn receive(&mut self, data: &[u8], mut sink: impl FnMut(FrameKind, &[u8])) -> Vec<Event> {
        self.receive_frames(data, |_, kind, payload| sink(kind, payload))
    }

    /// [`Connection::receive`] with a sink that is also told the proved peer's id (`(peer_id, kind,
    /// payload)`): frames that arrive in the same read as the hello reach a sink that learns who sent them
    /// without waiting for the caller to see the `Established` event.
    pub fn receive_frames(
        &mut self,
        data: &[u8],
        mut sink: impl FnMut(&str, FrameKind, &[u8]),
    ) -> Vec<Event> {
        let mut events = Vec::new();
        let frames_before = self.flow.counts.frames;
        match self.transport {
            Transport::Tls(_) => self.receive_tls(data, &mut sink, &mut events),
            Transport::Plain => {
                // The bytes are the plaintext: taken where they lie, without a copy.
                self.flow.counts.tls_bytes_in += data.len() as u64;
                let mut rest = data;
                while !rest.is_empty() && self.flow.stage != Stage::Closed {
                    let (used, after) = self.flow.absorb(rest, &mut sink);
                    rest = &rest[used..];
                    self.after(after, &mut events);
                }
            }
        }
        if self.flow.stage == Stage::Established && self.flow.counts.frames > frames_before {
            self.send_ack();
        }
        self.flush();
        events
    }

    fn receive_tls(
        &mut self,
        data: &[u8],
        sink: &mut impl FnMut(&str, FrameKind, &[u8]),
        events: &mut Vec<Event>,
    ) {
        let mut rest = data;
        while !rest.is_empty() && self.flow.stage != Stage::Closed {
            let Transport::Tls(tls) = &mut self.transport else {
                return;
            };
            let before = rest.len();
            match tls.read_tls(&mut rest) {
                Ok(0) => break, // close_notify was received: nothing after it counts
                Ok(_) => {}
                Err(_) => {
                    // Only when plaintext was left unread, which process_plaintext never does.
                    self.fail(
                        Failure::Tls(TlsError::General("receive buffer full".into())),
                        events,
                    );
                    break;
                }
            }
            self.flow.counts.tls_bytes_in += (before - rest.len()) as u64;
            let processed = tls.process_new_packets();
            let handshaking = tls.is_handshaking();
            self.refused |= processed.is_err();
            if processed.is_ok() && self.flow.stage == Stage::Tls && !handshaking {
                self.tls_done();
            }
            // Records before a bad one in the same read were authenticated: their plaintext is taken
            // (delivered and counted) before the failure ends the connection (unacknowledged: see `fail`).
            self.process_plaintext(sink, events);
            match processed {
                Err(err) => {
                    let failure = match refusal_of(&err) {
                        Some(refusal) => Failure::Certificate {
                            reason: refusal.reason,
                            detail: refusal.detail.clone(),
                        },
                        None => Failure::Tls(err),
                    };
                    self.fail(failure, events);
                    break;
                }
                Ok(state) if state.peer_has_closed() && self.flow.stage != Stage::Closed => {
                    if self.flow.stage == Stage::Established {
                        // close_notify ends the peer's direction only: the frames it sent before it,
                        // in this same read, are still acknowledged.
                        self.send_ack();
                        self.flow.stage = Stage::Closed;
                        events.push(Event::Closed);
                    } else {
                        self.fail(Failure::ClosedEarly, events);
                    }
                }
                Ok(_) => {}
            }
        }
    }

    /// Server: one ack per receive call, for the frames taken so far (handed to the sink, which delivers
    /// or drops and counts them).
    fn send_ack(&mut self) {
        if !self.is_client() && self.flow.counts.frames > self.flow.counts.acked {
            let taken = self.flow.counts.frames;
            self.flow.counts.acked = taken;
            self.write(&encode_ack(taken));
        }
    }

    /// TLS is done (at once in plaintext): the server sends its challenge.
    fn tls_done(&mut self) {
        self.flow.stage = Stage::Challenge;
        if let Role::Server { nonce, .. } = &self.flow.role {
            let challenge = handshake::encode_challenge(nonce);
            self.write(&challenge);
        }
    }

    /// The plaintext rustls decrypted, taken where it lies (rustls' buffer), through [`Flow::absorb`].
    fn process_plaintext(&mut self, sink: &mut impl FnMut(&str, FrameKind, &[u8]), events: &mut Vec<Event>) {
        use std::io::BufRead;
        loop {
            let after = {
                let Transport::Tls(tls) = &mut self.transport else {
                    return;
                };
                let mut reader = tls.reader();
                if self.flow.stage == Stage::Closed {
                    // Drain and ignore what follows an end (bytes after a refusal, after a failure).
                    while let Ok(chunk) = reader.fill_buf() {
                        let n = chunk.len();
                        if n == 0 {
                            break;
                        }
                        reader.consume(n);
                    }
                    return;
                }
                let chunk = match reader.fill_buf() {
                    Ok(chunk) if !chunk.is_empty() => chunk,
                    _ => return,
                };
                let (used, after) = self.flow.absorb(chunk, sink);
                reader.consume(used);
                after
            };
            self.after(after, events);
        }
    }

    /// What [`Flow::absorb`] left to do.
    fn after(&mut self, after: After, events: &mut Vec<Event>) {
        match after {
            After::Nothing => {}
            After::Fail(failure) => self.fail(failure, events),
            After::HandshakeFailed(err) => self.handshake_failed(err, events),
            After::MessageComplete => self.message_complete(events),
        }
    }

    fn handshake_failed(&mut self, err: HandshakeError, events: &mut Vec<Event>) {
        if !self.is_client() {
            // As the Python server did: another version is told so; a malformed hello is answered
            // bad_hello; bytes that are not this protocol at all get no answer.
            let answer = match err {
                HandshakeError::UnsupportedVersion(_) => Some(Answer::UnsupportedVersion),
                HandshakeError::BadMagic { .. } => None,
                _ => Some(Answer::BadHello),
            };
            if let Some(answer) = answer {
                let wire = handshake::encode_answer(answer as u8, &err.to_string());
                self.write(&wire);
            }
        }
        self.fail(Failure::Handshake(err), events);
    }

    fn message_complete(&mut self, events: &mut Vec<Event>) {
        let message = std::mem::take(&mut self.flow.message);
        match &self.flow.role {
            Role::Client { .. } if self.flow.stage != Stage::Answer => self.send_hello(&message, events),
            Role::Client { .. } => self.take_answer(&message, events),
            Role::Server { .. } => self.judge_hello(&message, events),
        }
    }

    fn send_hello(&mut self, message: &[u8], events: &mut Vec<Event>) {
        let Ok(Parsed::Done { message: nonce, .. }) = handshake::parse_challenge(message) else {
            return; // parse_message said it is complete
        };
        let Role::Client { epoch, .. } = self.flow.role else {
            return;
        };
        let local_id = self.security.local_id().to_owned();
        let wire = match self.security.trust() {
            Trust::Keys { key, peers } => {
                let Role::Client { peer_id, .. } = &self.flow.role else {
                    return;
                };
                // The verifier accepted exactly this key for the peer dialled.
                let Some(server_key) = peers.key_of(peer_id) else {
                    return;
                };
                let signed =
                    handshake::hello_transcript(&nonce, &server_key, &local_id, epoch, key.public_key())
                        .map_err(Failure::Handshake)
                        .and_then(|transcript| key.sign(&transcript).map_err(Failure::Tls));
                let signature = match signed {
                    Ok(signature) => signature,
                    Err(failure) => return self.fail(failure, events),
                };
                handshake::encode_hello(&Hello {
                    peer_id: &local_id,
                    epoch,
                    public_key: Some(key.public_key()),
                    signature: Some(&signature),
                })
            }
            Trust::Ca { .. } | Trust::Insecure { .. } => handshake::encode_hello(&Hello {
                peer_id: &local_id,
                epoch,
                public_key: None,
                signature: None,
            }),
        };
        match wire {
            Ok(wire) => {
                self.write(&wire);
                self.flow.stage = Stage::Answer;
            }
            Err(err) => self.fail(Failure::Handshake(err), events),
        }
    }

    fn take_answer(&mut self, message: &[u8], events: &mut Vec<Event>) {
        let Ok(Parsed::Done {
            message: (code, text),
            ..
        }) = handshake::parse_answer(message)
        else {
            return;
        };
        let Role::Client { peer_id, epoch } = &self.flow.role else {
            return;
        };
        if code == Answer::Accepted as u8 {
            self.flow.stage = Stage::Established;
            self.flow.peer_id = Some(peer_id.clone());
            events.push(Event::Established {
                peer_id: peer_id.clone(),
                announced_id: text.to_owned(),
                epoch: *epoch,
            });
        } else {
            let reason =
                Answer::from_code(code).map_or_else(|| format!("refused_{code}"), |a| a.reason().to_owned());
            events.push(Event::Refused {
                code,
                reason,
                text: text.to_owned(),
                claimed: String::new(),
            });
            self.close();
        }
    }

    fn judge_hello(&mut self, message: &[u8], events: &mut Vec<Event>) {
        let Ok(Parsed::Done { message: hello, .. }) = handshake::parse_hello(message) else {
            return;
        };
        let Role::Server { nonce, refuse } = &self.flow.role else {
            return;
        };
        let verdict = match refuse {
            Some(answer) => Err((*answer, answer.reason().replace('_', " "))),
            None => judge(&self.security, &hello, nonce, self.peer_certificates()),
        };
        match verdict {
            Ok(peer_id) => {
                let answer = handshake::encode_answer(Answer::Accepted as u8, self.security.local_id());
                self.write(&answer);
                self.flow.stage = Stage::Established;
                self.flow.peer_id = Some(peer_id.clone());
                events.push(Event::Established {
                    peer_id,
                    announced_id: hello.peer_id.to_owned(),
                    epoch: hello.epoch,
                });
            }
            Err((answer, text)) => {
                let wire = handshake::encode_answer(answer as u8, &text);
                self.write(&wire);
                events.push(Event::Refused {
                    code: answer as u8,
                    reason: answer.reason().to_owned(),
                    text,
                    claimed: hello.peer_id.to_owned(),
                });
                self.close();
            }
        }
    }

    /// Client: frames `packets` into the output (encrypted), as many as fit under [`MAX_OUTPUT`]; returns
    /// how many were taken. The caller writes the output, then sends the rest.
    pub fn send_packets<'a>(
        &mut self,
        packets: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<usize, SendError> {
        self.check_sendable()?;
        let max = self.security.max_frame_size();
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let mut taken = 0usize;
        let mut bytes = 0u64;
        let mut error = None;
        for packet in packets {
            if self.out.len() + scratch.len() >= MAX_OUTPUT {
                break;
            }
            if let Err(err) = encode_frames_into([packet], max, &mut scratch) {
                error = Some(err);
                break;
            }
            taken += 1;
            bytes += packet.len() as u64;
        }
        self.write_frames(&scratch, taken as u64, bytes);
        self.scratch = scratch;
        match error {
            Some(error) => Err(SendError::Framing { taken, error }),
            None => Ok(taken),
        }
    }

    /// Client: one offload frame (a virtio_net_hdr and its super-packet); `Ok(false)` when the output is
    /// full (write it first).
    pub fn send_offload(&mut self, header: &[u8; VNET_HDR_LEN], packet: &[u8]) -> Result<bool, SendError> {
        self.check_sendable()?;
        if self.out.len() >= MAX_OUTPUT {
            return Ok(false);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let result = encode_offload_frame_into(header, packet, &mut scratch);
        if result.is_ok() {
            self.write_frames(&scratch, 1, (VNET_HDR_LEN + packet.len()) as u64);
            self.flow.counts.offload_frames += 1;
        }
        self.scratch = scratch;
        result
            .map(|()| true)
            .map_err(|error| SendError::Framing { taken: 0, error })
    }

    /// Client: bytes already framed (a dispatcher's queue frames packets as it queues them) encrypted into
    /// the output as they are; they must hold `expected` frames (keepalives, length 0, are sent and counted
    /// as keepalives, not frames), else [`SendError::Miscounted`]. The frames are checked as the receiver will check them (a length within
    /// the maximum frame size, an offload frame long enough for its header and not above
    /// [`MAX_OFFLOAD_FRAME`]) and must end at a frame boundary: otherwise nothing is taken
    /// ([`SendError::Unframed`]), since the receiver would close the connection at the first bad prefix.
    ///
    /// Unlike [`Connection::send_packets`] this takes the whole buffer even past [`MAX_OUTPUT`]: the
    /// caller bounds what waits (its in-flight window, and it waits for the output to drain before the next
    /// write once the output is large).
    pub fn send_framed(&mut self, wire: &[u8], expected: u64) -> Result<(), SendError> {
        match self.send_framed_through(wire, expected, |_| Ok::<usize, std::convert::Infallible>(0))? {
            Ok(()) => Ok(()),
            Err(never) => match never {},
        }
    }

    /// [`Connection::send_framed`], offering the bytes to `write` (the socket: it returns how many it
    /// took) when they go out as they are: in plaintext, with nothing waiting in the output before them.
    /// Only what `write` did not take is kept in the output, so a batch the socket takes whole is never
    /// copied. With TLS the records go to the output (write it with the caller's flush). `Ok(Err(_))`:
    /// the bytes were taken and `write` failed (the connection is gone).
    pub fn send_framed_through<E>(
        &mut self,
        wire: &[u8],
        expected: u64,
        write: impl FnOnce(&[u8]) -> Result<usize, E>,
    ) -> Result<Result<(), E>, SendError> {
        self.check_sendable()?;
        let max = self.security.max_frame_size().min(MAX_FRAME_LEN);
        let (mut frames, mut keepalives, mut offload, mut at) = (0u64, 0u64, 0u64, 0usize);
        while at < wire.len() {
            let Some(prefix) = wire.get(at..at + LENGTH_PREFIX_LEN) else {
                return Err(SendError::Unframed { at, error: None });
            };
            let raw = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
            let len = (raw & !OFFLOAD_FLAG) as usize;
            if raw == 0 {
                keepalives += 1;
            } else if raw & OFFLOAD_FLAG != 0 {
                if len <= VNET_HDR_LEN {
                    let error = FramingError::ShortOffload { len: len as u64 };
                    return Err(SendError::Unframed {
                        at,
                        error: Some(error),
                    });
                }
                if len > MAX_OFFLOAD_FRAME {
                    let error = FramingError::TooLarge {
                        len: len as u64,
                        max: MAX_OFFLOAD_FRAME,
                    };
                    return Err(SendError::Unframed {
                        at,
                        error: Some(error),
                    });
                }
                offload += 1;
                frames += 1;
            } else {
                if len > max {
                    let error = FramingError::TooLarge { len: len as u64, max };
                    return Err(SendError::Unframed {
                        at,
                        error: Some(error),
                    });
                }
                frames += 1;
            }
            let end = at + LENGTH_PREFIX_LEN + len;
            if end > wire.len() {
                return Err(SendError::Unframed { at, error: None });
            }
            at = end;
        }
        if frames != expected {
            return Err(SendError::Miscounted {
                framed: frames,
                expected,
            });
        }
        if wire.is_empty() {
            return Ok(Ok(()));
        }
        let payload = (wire.len() as u64) - LENGTH_PREFIX_LEN as u64 * (frames + keepalives);
        self.flow.counts.frames += frames;
        self.flow.counts.frame_bytes += payload;
        self.flow.counts.offload_frames += offload;
        self.flow.counts.keepalives += keepalives;
        if matches!(self.transport, Transport::Plain) && self.out.is_empty() {
            let written = match write(wire) {
                Ok(n) => n.min(wire.len()),
                Err(err) => return Ok(Err(err)),
            };
            self.flow.counts.tls_bytes_out += written as u64;
            self.write(&wire[written..]);
        } else {
            self.write(wire);
            self.flush();
        }
        Ok(Ok(()))
    }

    /// Client: a keepalive (a length prefix of 0), so that the server does not close an idle connection.
    pub fn send_keepalive(&mut self) -> Result<(), SendError> {
        self.check_sendable()?;
        self.write(&KEEPALIVE);
        self.flow.counts.keepalives += 1;
        self.flush();
        Ok(())
    }

    fn check_sendable(&self) -> Result<(), SendError> {
        match (self.flow.stage, self.is_client()) {
            (Stage::Established, true) => Ok(()),
            (Stage::Closed, _) => Err(SendError::Closed),
            _ => Err(SendError::NotEstablished),
        }
    }

    fn write_frames(&mut self, wire: &[u8], frames: u64, bytes: u64) {
        if frames == 0 {
            return;
        }
        self.write(wire);
        self.flow.counts.frames += frames;
        self.flow.counts.frame_bytes += bytes;
        self.flush();
    }
}

/// The server's verdict on a hello: the configured peer it proved to be, or a refusal and its text. The
/// rules of `vpn_packet.transport.handshake.judge_hello`.
fn judge(
    security: &Security,
    hello: &Hello<'_>,
    nonce: &[u8; NONCE_LEN],
    peer_certificates: Option<&[rustls::pki_types::CertificateDer<'static>]>,
) -> Result<String, (Answer, String)> {
    match security.trust() {
        Trust::Keys { key, peers } => {
            let (Some(public_key), Some(signature)) = (hello.public_key, hello.signature) else {
                return Err((
                    Answer::KeyRequired,
                    "this node authenticates peers by key; the hello has none".into(),
                ));
            };
            if let Err(problem) = accept_public_key(public_key) {
                return Err((
                    Answer::BadKey,
                    format!("your public key cannot be trusted: {problem}"),
                ));
            }
            let Some(peer_id) = peers.peer_of_key(public_key) else {
                if peers.contains(hello.peer_id) {
                    return Err((
                        Answer::KeyMismatch,
                        format!("your key is not the one configured here for {:?}", hello.peer_id),
                    ));
                }
                return Err((
                    Answer::UnknownPeer,
                    format!(
                        "no peer here has your key (you call yourself {:?})",
                        hello.peer_id
                    ),
                ));
            };
            let Ok(client_key) = <&[u8; 32]>::try_from(public_key) else {
                return Err((Answer::BadHello, "a public key of another length".into()));
            };
            let transcript =
                handshake::hello_transcript(nonce, key.public_key(), hello.peer_id, hello.epoch, client_key)
                    .map_err(|err| (Answer::BadHello, err.to_string()))?;
            if !verify_signature(public_key, &transcript, signature) {
                return Err((
                    Answer::BadSignature,
                    "the hello's signature does not verify with its key".into(),
                ));
            }
            Ok(peer_id)
        }
        // Plaintext: a peer is whoever it claims to be, if a peer of that id is configured here.
        Trust::Insecure { peers } => {
            if !peers.contains(hello.peer_id) {
                return Err((
                    Answer::UnknownPeer,
                    format!("no peer {:?} is configured here", hello.peer_id),
                ));
            }
            Ok(hello.peer_id.to_owned())
        }
        Trust::Ca { peers, .. } => {
            if !peers.contains(hello.peer_id) {
                return Err((
                    Answer::UnknownPeer,
                    format!("no peer {:?} is configured here", hello.peer_id),
                ));
            }
            let names = peer_certificates
                .and_then(|certs| certs.first())
                .map(|cert| certificate_names(cert))
                .unwrap_or_default();
            if !names.iter().any(|name| name == hello.peer_id) {
                let named = if names.is_empty() {
                    "nobody".to_owned()
                } else {
                    names.join(", ")
                };
                return Err((
                    Answer::IdentityMismatch,
                    format!("the certificate names {named}, not {:?}", hello.peer_id),
                ));
            }
            if let Some(other) = names
                .iter()
                .find(|name| *name != hello.peer_id && peers.contains(name.as_str()))
            {
                return Err((
                    Answer::IdentityMismatch,
                    format!("the certificate also names peer {other:?}: one certificate, one peer"),
                ));
            }
            Ok(hello.peer_id.to_owned())
        }
    }
}
