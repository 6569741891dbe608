//! Adversaries of the connection core (issue 20, item 6), one body each, run two ways: by libFuzzer
//! (`fuzz/fuzz_targets/{server_preauth,server_session,client_session}.rs` include this file with `#[path]`)
//! and by proptest on stable in CI (`rust/core/tests/adversary.rs`), so the invariants are written once.
//!
//! - [`server_preauth`]: anyone, before authentication: arbitrary bytes to a fresh server.
//! - [`server_session`]: an authenticated peer (a real TLS 1.3 handshake and a properly signed hello),
//!   then arbitrary plaintext inside its TLS records, or arbitrary raw bytes where records belong, or both,
//!   through the receive path a node runs ([`Server`]: the connection's frames, each packet's source
//!   checked, written to a TUN, as [`vpn_packet_core::receive::ReceiveSession::pump`] composes them).
//! - [`client_session`]: a dialling client fed what a server may send: raw bytes, arbitrary plaintext
//!   after TLS, an arbitrary answer after a valid challenge, arbitrary acks after an accepted answer.
//!
//! What must hold for any input: no panic; what a connection holds stays within its documented bound;
//! every frame handed out is within its size bound and an offload frame's header is one the kernel and
//! the segmenter accept; a failure has a reason of [`Failure::REASONS`] and closes the connection; nothing
//! is taken after the end; the frames taken are exactly those an independent decoder finds in the
//! plaintext up to the first bad one, and the reason is that one's; every frame taken is acknowledged
//! (unless rustls refused a record in the same read: it sends nothing after its alert) and the ack the
//! peer gets is the count the server keeps; the receive path's counts add up (frames taken + extra
//! segments = delivered + every drop by reason).
//!
//! Keys are fixed (Ed25519 keys from constant seeds, self-signed certificates as `vpn-packet genkey`
//! writes them), so a failing input replays against the same identities; TLS's own randomness remains.
#![allow(dead_code)] // each includer uses part of it

use std::io::{Read, Write};
use std::sync::OnceLock;

use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::{ClientConnection, ServerConnection};
use vpn_packet_core::ack::AckDecoder;
use vpn_packet_core::connection::{Connection, Event, Failure, Stage, MAX_OUTPUT};
use vpn_packet_core::framing::{FrameDecoder, FrameKind, MAX_OFFLOAD_FRAME, VNET_HDR_LEN};
use vpn_packet_core::gso::{self, VirtioNetHdr};
use vpn_packet_core::handshake::{self, Answer, Hello, Parsed, MAX_ANSWER_LEN, MAX_HELLO_LEN};
use vpn_packet_core::inbound::{Inbound, TunWrite, WriteOutcome};
use vpn_packet_core::prefix::{parse_prefix, PrefixTable};
use vpn_packet_core::tls::{NodeKey, Security};

/// The largest packet frame the server takes (a tunnel MTU's worth, so that the fuzzer reaches the bound).
pub const MAX_FRAME: usize = 1500;

/// The most a connection holds between calls: a handshake message, one partial frame, a partial ack.
pub const BUFFER_BOUND: usize = MAX_HELLO_LEN + 4 + MAX_OFFLOAD_FRAME + 9;

/// Index of the authenticated client ("a") in [`table`]; index 1 is another peer.
pub const PEER_A: u32 = 0;

// --- fixed identities ------------------------------------------------------------------------------------

/// A key file as `vpn-packet genkey` writes one (PKCS#8 Ed25519 key, then its self-signed certificate), for
/// the Ed25519 key of the constant `seed`.
pub fn fixed_key_file(name: &str, seed: u8) -> Vec<u8> {
    // PKCS#8 v1 of an Ed25519 private key: this fixed prefix, then the 32-byte seed (RFC 8410).
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
    ];
    der.extend_from_slice(&[seed; 32]);
    let key = KeyPair::try_from(der.as_slice()).expect("a PKCS#8 Ed25519 key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("a self-signed certificate");
    format!("{}{}", key.serialize_pem(), cert.pem()).into_bytes()
}

/// Node "a" (the client) and node "b" (the server), each knowing the other by key.
pub struct Nodes {
    pub client: Security,
    pub server: Security,
    pub client_key: NodeKey,
    pub server_public: [u8; 32],
}

pub fn nodes() -> &'static Nodes {
    static NODES: OnceLock<Nodes> = OnceLock::new();
    NODES.get_or_init(|| {
        let (a, b) = (fixed_key_file("a", 0xa1), fixed_key_file("b", 0xb2));
        let (ka, kb) = (NodeKey::from_pem(&a).unwrap(), NodeKey::from_pem(&b).unwrap());
        Nodes {
            client: Security::with_keys("a", &a, [("b", &kb.public_key()[..])]).unwrap(),
            server: Security::with_keys("b", &b, [("a", &ka.public_key()[..])])
                .unwrap()
                .with_max_frame_size(MAX_FRAME),
            server_public: *kb.public_key(),
            client_key: ka,
        }
    })
}

/// The routing table the server checks sources against: "a" owns 10.1.0.0/16 and fd01::/16, another
/// peer 10.2.0.0/16.
pub fn table() -> &'static PrefixTable<u32> {
    static TABLE: OnceLock<PrefixTable<u32>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = PrefixTable::new();
        for (prefix, peer) in [("10.1.0.0/16", PEER_A), ("fd01::/16", PEER_A), ("10.2.0.0/16", 1)] {
            let (addr, len) = parse_prefix(prefix).unwrap();
            t.insert(addr, len, peer).unwrap();
        }
        t
    })
}

// --- a TUN that records, and may refuse ------------------------------------------------------------------

/// A TUN in memory: every write recorded (header and packet), its outcome taken from `script` in turn
/// (0..=252 written, 253 no room, 254 refused, 255 the device gone); an empty script writes everything.
#[derive(Debug, Default)]
pub struct Tun {
    pub script: Vec<u8>,
    pub written: Vec<(Option<Vec<u8>>, Vec<u8>)>,
    writes: usize,
}

impl TunWrite for Tun {
    fn write_packet(&mut self, vnet_header: Option<&[u8]>, packet: &[u8]) -> WriteOutcome {
        let step = self
            .script
            .get(self.writes % self.script.len().max(1))
            .copied()
            .unwrap_or(0);
        self.writes += 1;
        match step {
            253 => WriteOutcome::Dropped,
            254 => WriteOutcome::Refused,
            255 => WriteOutcome::Fatal(5),
            _ => {
                self.written
                    .push((vnet_header.map(<[u8]>::to_vec), packet.to_vec()));
                WriteOutcome::Written
            }
        }
    }
}

// --- the oracle: what an authenticated peer's plaintext must give ------------------------------------------

/// What a correct server takes from `plaintext`: the frames up to the first bad one, and the reason of
/// that one (a framing error, or an offload header [`gso::validate`] refuses), decoded without TLS and
/// without the connection, in one piece.
pub fn expected_frames(
    plaintext: &[u8],
    max_frame: usize,
) -> (Vec<(FrameKind, Vec<u8>)>, Option<&'static str>) {
    let mut decoder = FrameDecoder::new(max_frame);
    let mut frames = Vec::new();
    let mut bad_offload = false;
    let result = decoder.feed_frames(plaintext, |kind, payload| {
        if bad_offload {
            return;
        }
        if kind == FrameKind::Offload {
            let (header, packet) = payload.split_at(VNET_HDR_LEN);
            if VirtioNetHdr::parse(header)
                .and_then(|h| gso::validate(&h, packet))
                .is_err()
            {
                bad_offload = true;
                return;
            }
        }
        frames.push((kind, payload.to_vec()));
    });
    let reason = if bad_offload {
        Some("offload_invalid")
    } else {
        result.err().map(|err| err.reason())
    };
    (frames, reason)
}

// --- the server's receive path ----------------------------------------------------------------------------

/// A server connection and the receive path behind it, as a node runs it: frames to the source check and
/// the TUN ([`vpn_packet_core::receive::ReceiveSession::pump`]'s composition, without the socket).
pub struct Server {
    pub conn: Connection,
    pub inbound: Inbound,
    pub tun: Tun,
    /// Every frame the connection handed out, in order.
    pub frames: Vec<(FrameKind, Vec<u8>)>,
    pub events: Vec<Event>,
    /// Frames taken when the connection closed (nothing may be taken after).
    frames_at_close: Option<u64>,
}

/// Node "b" in insecure mode (plaintext, `[node] insecure = true`), with "a" among its configured peers.
pub fn plain_server_node() -> &'static Security {
    static NODE: OnceLock<Security> = OnceLock::new();
    NODE.get_or_init(|| {
        Security::insecure("b", ["a"])
            .unwrap()
            .with_max_frame_size(MAX_FRAME)
    })
}

impl Server {
    /// Node "b"'s server in key mode (TLS).
    pub fn new(vnet_header: bool, script: Vec<u8>) -> Server {
        Server::of(&nodes().server, vnet_header, script)
    }

    /// A server of `node` (key mode, or plaintext: [`plain_server_node`]).
    pub fn of(node: &Security, vnet_header: bool, script: Vec<u8>) -> Server {
        let conn = Connection::server_with_nonce(node, None, [7; handshake::NONCE_LEN]).unwrap();
        Server {
            conn,
            inbound: Inbound::new(MAX_FRAME, vnet_header),
            tun: Tun {
                script,
                ..Tun::default()
            },
            frames: Vec::new(),
            events: Vec::new(),
            frames_at_close: None,
        }
    }

    /// Bytes read from the socket.
    pub fn feed(&mut self, data: &[u8]) {
        let Server {
            conn,
            inbound,
            tun,
            frames,
            ..
        } = self;
        let events = conn.receive_frames(data, |peer_id, kind, payload| {
            assert_eq!(peer_id, "a", "frames are named by the proved peer");
            check_frame(kind, payload);
            frames.push((kind, payload.to_vec()));
            let index = if peer_id == "a" { PEER_A } else { u32::MAX };
            inbound.take_frame(kind, payload, table(), index, tun);
        });
        self.events.extend(events);
        self.check();
    }

    /// The stream ended.
    pub fn eof(&mut self) {
        let events = self.conn.receive_eof();
        self.events.extend(events);
        self.check();
    }

    pub fn established(&self) -> bool {
        self.events.iter().any(|e| matches!(e, Event::Established { .. }))
    }

    /// The reason of the failure that ended the connection, if one did.
    pub fn failure(&self) -> Option<&'static str> {
        self.conn.failure().map(Failure::reason)
    }

    /// What must hold after every call, whatever was fed.
    pub fn check(&mut self) {
        let conn = &self.conn;
        let counts = conn.counts();
        assert!(conn.buffered() <= BUFFER_BOUND, "holds {} bytes", conn.buffered());
        assert!(conn.output().len() <= MAX_OUTPUT);
        assert_eq!(
            counts.frames,
            self.frames.len() as u64,
            "frames counted = frames taken"
        );
        let offload = self
            .frames
            .iter()
            .filter(|(k, _)| *k == FrameKind::Offload)
            .count();
        assert_eq!(counts.offload_frames, offload as u64);
        // Every frame taken is acknowledged before the call returns, also when the connection failed
        // after taking it; except after rustls refused a record: it sends nothing after its alert, and
        // `acked` counts only what was sent.
        if conn.failure().is_some() {
            assert!(counts.acked <= counts.frames);
        } else {
            assert_eq!(counts.acked, counts.frames, "{:?}", self.events);
        }
        if counts.frames > 0 {
            assert!(self.established());
        }
        // At most one end, and a failure names a known reason.
        let ends = ends(&self.events);
        if let Some(failure) = conn.failure() {
            assert!(Failure::REASONS.contains(&failure.reason()), "{failure:?}");
            assert!(!failure.to_string().is_empty());
            assert!(matches!(self.events.last(), Some(Event::Failed(f)) if f == failure));
        }
        if ends == 1 || conn.failure().is_some() {
            assert_eq!(conn.stage(), Stage::Closed);
        }
        if conn.stage() == Stage::Closed {
            let at_close = *self.frames_at_close.get_or_insert(counts.frames);
            assert_eq!(counts.frames, at_close, "a frame taken after the end");
        }
        // The receive path's counts add up: one frame is one packet or one super-packet; a super-packet
        // segmented into n packets adds n - 1; every packet is delivered or dropped by a reason.
        let c = &self.inbound.counts;
        assert_eq!(
            counts.frames + c.extra_segments,
            c.delivered + c.spoofed + c.unparsable + c.offload_invalid + c.write_dropped + c.write_errors,
            "{c:?}"
        );
        // The connection refused every offload header the receive path would: none is dropped there.
        assert_eq!(
            c.offload_invalid, 0,
            "an offload frame passed the connection but not the TUN path"
        );
        assert_eq!(c.delivered as usize, self.tun.written.len());
    }
}

/// How many of `events` end the connection (failed, closed, refused): at most one, whatever the input.
pub fn ends(events: &[Event]) -> usize {
    let ends = events
        .iter()
        .filter(|e| matches!(e, Event::Failed(_) | Event::Closed | Event::Refused { .. }))
        .count();
    assert!(ends <= 1, "{events:?}");
    ends
}

/// A frame handed out is within its bound, and an offload frame's header is one the segmenter and a
/// kernel would accept.
pub fn check_frame(kind: FrameKind, payload: &[u8]) {
    match kind {
        FrameKind::Packet => assert!((1..=MAX_FRAME).contains(&payload.len()), "{}", payload.len()),
        FrameKind::Offload => {
            assert!(payload.len() > VNET_HDR_LEN && payload.len() <= MAX_OFFLOAD_FRAME);
            let (header, packet) = payload.split_at(VNET_HDR_LEN);
            let header = VirtioNetHdr::parse(header).expect("a header the connection checked");
            assert!(gso::validate(&header, packet).is_ok());
        }
    }
}

// --- a peer speaking the protocol by hand ------------------------------------------------------------------

/// Every TLS byte `tls` wants to write.
pub fn tls_output(tls: &mut rustls::Connection) -> Vec<u8> {
    let mut out = Vec::new();
    while tls.wants_write() {
        if tls.write_tls(&mut out).is_err() {
            break;
        }
    }
    out
}

/// Reads `data` into `tls`, appending the plaintext; false once rustls refused it.
pub fn tls_input(tls: &mut rustls::Connection, data: &[u8], plaintext: &mut Vec<u8>) -> bool {
    let mut rest = data;
    while !rest.is_empty() {
        match tls.read_tls(&mut rest) {
            Ok(0) | Err(_) => return true,
            Ok(_) => {}
        }
        let processed = tls.process_new_packets();
        // The records before a bad one were authenticated: their plaintext is read either way.
        let _ = tls.reader().read_to_end(plaintext);
        if processed.is_err() {
            return false;
        }
    }
    true
}

/// A rustls client configured as node "a" dialling "b" (its verifier checks the server's key), driven by
/// hand: it completes TLS and sends a properly signed hello, then whatever the test makes it send.
pub struct Peer {
    pub tls: rustls::Connection,
    /// Plaintext received from the server.
    pub plaintext: Vec<u8>,
    /// Plaintext sent after the hello.
    pub sent: Vec<u8>,
}

impl Peer {
    /// A peer that has not started (its ClientHello waits in its output).
    pub fn dialling() -> Peer {
        let name = rustls::pki_types::ServerName::try_from("peer.invalid").unwrap();
        let tls = ClientConnection::new(nodes().client.client_config("b").unwrap(), name).unwrap();
        Peer {
            tls: tls.into(),
            plaintext: Vec::new(),
            sent: Vec::new(),
        }
    }

    /// A peer authenticated to `server` (the handshake done in memory).
    pub fn authenticated(server: &mut Server) -> Peer {
        let mut peer = Peer::dialling();
        peer.exchange(server);
        peer.send_hello();
        peer.exchange(server);
        assert!(server.established(), "{:?}", server.events);
        assert_eq!(server.conn.stage(), Stage::Established);
        peer.take_answer();
        peer
    }

    /// TLS is done and the challenge received: the hello, signed with the challenge.
    pub fn send_hello(&mut self) {
        let nodes = nodes();
        let Ok(Parsed::Done {
            message: nonce,
            consumed,
        }) = handshake::parse_challenge(&self.plaintext)
        else {
            panic!("no challenge: {:?}", self.plaintext);
        };
        self.plaintext.drain(..consumed);
        let key = nodes.client_key.public_key();
        let transcript = handshake::hello_transcript(&nonce, &nodes.server_public, "a", 1, key).unwrap();
        let signature = nodes.client_key.sign(&transcript).unwrap();
        let hello = Hello {
            peer_id: "a",
            epoch: 1,
            public_key: Some(key),
            signature: Some(&signature),
        };
        self.tls
            .writer()
            .write_all(&handshake::encode_hello(&hello).unwrap())
            .unwrap();
    }

    /// The server's answer is in: it accepted.
    pub fn take_answer(&mut self) {
        let Ok(Parsed::Done {
            message: (code, _),
            consumed,
        }) = handshake::parse_answer(&self.plaintext)
        else {
            panic!("no answer: {:?}", self.plaintext);
        };
        assert_eq!(code, Answer::Accepted as u8);
        self.plaintext.drain(..consumed);
    }

    /// Moves bytes both ways until both are quiet.
    pub fn exchange(&mut self, server: &mut Server) {
        for _ in 0..32 {
            let to_server = tls_output(&mut self.tls);
            let to_client = server.conn.take_output();
            if to_server.is_empty() && to_client.is_empty() {
                return;
            }
            server.feed(&to_server);
            tls_input(&mut self.tls, &to_client, &mut self.plaintext);
        }
        panic!("the two ends kept talking");
    }

    /// `plaintext` sealed into TLS records of at most `record` bytes each (rustls queues one record per
    /// write of up to 16 KiB); returns the TLS bytes, not yet delivered.
    pub fn seal(&mut self, plaintext: &[u8], record: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in plaintext.chunks(record.clamp(1, 16 * 1024)) {
            self.tls.writer().write_all(chunk).unwrap();
            out.extend_from_slice(&tls_output(&mut self.tls));
        }
        self.sent.extend_from_slice(plaintext);
        out
    }

    /// Takes the server's output (acks, an alert) and reads it.
    pub fn read_from(&mut self, server: &mut Server) {
        let to_client = server.conn.take_output();
        tls_input(&mut self.tls, &to_client, &mut self.plaintext);
    }
}

/// The acks in `plaintext` decode cleanly; returns the last count.
pub fn last_ack(plaintext: &[u8]) -> u64 {
    let mut acks = AckDecoder::new();
    let taken = acks.feed(plaintext).expect("a clean ack stream");
    assert_eq!(acks.buffered(), 0, "a partial ack record");
    taken
}

/// Splits a TLS byte stream into its records (header and body), as far as headers say; a partial record
/// at the end is its own piece.
pub fn records(stream: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let len = if rest.len() >= 5 {
            5 + usize::from(u16::from_be_bytes([rest[3], rest[4]]))
        } else {
            rest.len()
        };
        let (record, tail) = rest.split_at(len.min(rest.len()));
        out.push(record);
        rest = tail;
    }
    out
}

/// Cuts `data` into pieces of the sizes `cuts` gives in turn (1 at least; none: one piece).
pub fn pieces<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    if cuts.is_empty() {
        return vec![data];
    }
    let mut out = Vec::new();
    let mut at = 0;
    for &cut in cuts.iter().cycle() {
        if at >= data.len() {
            break;
        }
        let end = (at + cut.max(1)).min(data.len());
        out.push(&data[at..end]);
        at = end;
    }
    out
}

/// A reader of fuzz input: bytes, then small numbers, with defaults when the input runs out.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    pub fn byte(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().map_or((0, &[][..]), |(f, r)| (*f, r));
        self.0 = rest;
        first
    }
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

// --- (a) before authentication -------------------------------------------------------------------------

/// Arbitrary bytes to a fresh server, in reads of the size the first byte picks; half the time after the
/// start of a TLS handshake record, to get past rustls' first check. Never authenticates, never takes a
/// frame, stays within the bound, ends in a failure with a reason (at the latest when the stream ends).
pub fn server_preauth(data: &[u8]) {
    let mut input = Input(data);
    let mode = input.byte();
    let mut server = Server::new(false, Vec::new());
    let body = input.rest();
    let bytes = if mode & 1 == 1 {
        [&[0x16, 3, 1, 0x0b, 0xb8][..], body].concat()
    } else {
        body.to_vec()
    };
    for chunk in bytes.chunks(usize::from(mode >> 1) + 1) {
        server.feed(chunk);
        assert!(!server.established());
        assert!(server.frames.is_empty());
        // rustls answers a ClientHello with its flight; at most that (and an alert) is output.
        assert!(
            server.conn.output().len() <= 16 * 1024,
            "{}",
            server.conn.output().len()
        );
    }
    server.eof();
    assert!(!server.established());
    assert_eq!(server.conn.stage(), Stage::Closed);
    assert!(server.failure().is_some(), "{:?}", server.events);
}

// --- (b) an authenticated peer ------------------------------------------------------------------------------

/// An authenticated peer sends arbitrary plaintext in TLS records (cut where the input says), or raw bytes
/// where records belong, or both, or ends with close_notify. See the module documentation for what holds.
pub fn server_session(data: &[u8]) {
    let mut input = Input(data);
    let mode = input.byte();
    let record = usize::from(input.byte()) * 7 + 1;
    let read = usize::from(input.byte()) * 13 + 1;
    let split = usize::from(input.byte()) * 4;
    let script = input.take(usize::from(mode >> 5)).to_vec();
    let vnet_header = mode & 4 != 0;
    let close = mode & 8 != 0;
    let body = input.rest();
    let (plaintext, raw) = match mode & 3 {
        0 => (body, &[][..]),
        1 => (&[][..], body),
        _ => body.split_at(split.min(body.len())),
    };

    let mut server = Server::new(vnet_header, script);
    let mut peer = Peer::authenticated(&mut server);
    let mut stream = peer.seal(plaintext, record);
    if close && raw.is_empty() {
        peer.tls.send_close_notify();
        stream.extend_from_slice(&tls_output(&mut peer.tls));
    }
    stream.extend_from_slice(raw);
    for chunk in stream.chunks(read) {
        server.feed(chunk);
    }
    // The oracle, on the plaintext alone: the same frames, and the same reason when it has one.
    let (frames, reason) = expected_frames(plaintext, MAX_FRAME);
    assert_eq!(server.frames, frames);
    match reason {
        Some(reason) => assert_eq!(server.failure(), Some(reason), "{:?}", server.events),
        None if raw.is_empty() => {
            assert_eq!(server.failure(), None);
            if close {
                assert!(
                    matches!(server.events.last(), Some(Event::Closed)),
                    "{:?}",
                    server.events
                );
            }
        }
        None => {
            // Raw bytes where records belong: never plaintext; refused by TLS, or an unfinished record.
            if let Some(reason) = server.failure() {
                assert!(reason.starts_with("tls_"), "{reason}");
            }
        }
    }
    // Without raw bytes rustls refuses nothing: every frame taken is acknowledged, also on a failure.
    if raw.is_empty() {
        assert_eq!(server.conn.counts().acked, frames.len() as u64);
    }
    // The acks the peer got say what the server counts as acknowledged.
    peer.read_from(&mut server);
    assert_eq!(last_ack(&peer.plaintext), server.conn.counts().acked);
    server.eof();
    assert_eq!(server.conn.stage(), Stage::Closed);
    assert_eq!(server.frames, frames);
}

// --- (b') the same in plaintext (insecure mode) ----------------------------------------------------------------

/// An insecure node's server: the challenge is out at once; then, half the time, a valid hello from "a"
/// (accepted: a peer is the configured id it claims) before the body, else the body alone where the hello
/// belongs; in reads of the size the input picks. With the hello, the oracle holds as over TLS: the frames
/// of the body up to the first bad one, that one's reason, every frame taken acknowledged, and the acks on
/// the wire (after the answer) say so. Without it, arbitrary bytes authenticate only as a hello of "a".
pub fn plain_session(data: &[u8]) {
    let mut input = Input(data);
    let mode = input.byte();
    let read = usize::from(input.byte()) * 13 + 1;
    let script = input.take(usize::from(mode >> 5)).to_vec();
    let vnet_header = mode & 4 != 0;
    let with_hello = mode & 1 == 0;
    let body = input.rest();
    let mut server = Server::of(plain_server_node(), vnet_header, script);
    assert_eq!(
        server.conn.take_output(),
        handshake::encode_challenge(&[7; handshake::NONCE_LEN]),
        "the server speaks first, in plaintext"
    );
    let mut stream = Vec::new();
    if with_hello {
        stream = handshake::encode_hello(&Hello {
            peer_id: "a",
            epoch: 1,
            public_key: None,
            signature: None,
        })
        .unwrap();
    }
    stream.extend_from_slice(body);
    for chunk in stream.chunks(read) {
        server.feed(chunk);
    }
    if with_hello {
        assert!(server.established(), "{:?}", server.events);
        let (frames, reason) = expected_frames(body, MAX_FRAME);
        assert_eq!(server.frames, frames);
        assert_eq!(server.failure(), reason, "{:?}", server.events);
        assert_eq!(server.conn.counts().acked, frames.len() as u64);
        let out = server.conn.take_output();
        let Ok(Parsed::Done {
            message: (code, _),
            consumed,
        }) = handshake::parse_answer(&out)
        else {
            panic!("no answer: {out:?}")
        };
        assert_eq!(code, Answer::Accepted as u8);
        assert_eq!(last_ack(&out[consumed..]), frames.len() as u64);
    }
    server.eof();
    assert_eq!(server.conn.stage(), Stage::Closed);
}

// --- (c) a client and what a server may send ------------------------------------------------------------

/// A client `Connection` ("a" dialling "b") and a rustls server as node "b" driven by hand.
struct Dial {
    client: Connection,
    server: rustls::Connection,
    /// Plaintext the server received (the hello, ...).
    received: Vec<u8>,
    events: Vec<Event>,
}

impl Dial {
    fn new() -> Dial {
        let client = Connection::client(&nodes().client, "b", 1).unwrap();
        let server = ServerConnection::new(nodes().server.server_config().unwrap()).unwrap();
        Dial {
            client,
            server: server.into(),
            received: Vec::new(),
            events: Vec::new(),
        }
    }

    fn feed(&mut self, data: &[u8]) {
        let before = self.client.counts();
        let events = self
            .client
            .receive(data, |_, _| panic!("a client takes no frames"));
        self.events.extend(events);
        let counts = self.client.counts();
        assert!(self.client.buffered() <= BUFFER_BOUND);
        assert!(counts.acked >= before.acked, "acks went back");
        assert!(counts.acked <= counts.frames, "acked beyond sent");
        if let Some(failure) = self.client.failure() {
            assert!(Failure::REASONS.contains(&failure.reason()), "{failure:?}");
            assert_eq!(self.client.stage(), Stage::Closed);
        }
        ends(&self.events);
    }

    /// Moves bytes both ways until both are quiet.
    fn exchange(&mut self) {
        for _ in 0..32 {
            let to_server = self.client.take_output();
            let to_client = tls_output(&mut self.server);
            if to_server.is_empty() && to_client.is_empty() {
                return;
            }
            tls_input(&mut self.server, &to_server, &mut self.received);
            self.feed(&to_client);
        }
        panic!("the two ends kept talking");
    }

    /// `plaintext` from the server in records of at most `record` bytes, read by the client in reads of
    /// `read` bytes.
    fn send(&mut self, plaintext: &[u8], record: usize, read: usize) {
        let mut stream = Vec::new();
        for chunk in plaintext.chunks(record.clamp(1, 16 * 1024)) {
            self.server.writer().write_all(chunk).unwrap();
            stream.extend_from_slice(&tls_output(&mut self.server));
        }
        for chunk in stream.chunks(read.max(1)) {
            self.feed(chunk);
        }
    }

    fn established(&self) -> bool {
        self.events.iter().any(|e| matches!(e, Event::Established { .. }))
    }
}

/// What a server may send to a dialling client: mode 0 raw bytes from the start; 1 arbitrary plaintext
/// after TLS; 2 an arbitrary answer after a valid challenge; 3 arbitrary acks after an accepted answer and
/// some frames sent; 4 raw bytes after the accepted answer.
pub fn client_session(data: &[u8]) {
    let mut input = Input(data);
    let mode = input.byte();
    let record = usize::from(input.byte()) * 3 + 1;
    let read = usize::from(input.byte()) * 11 + 1;
    let sent = u64::from(input.byte() % 16);
    let body = input.rest();
    let mut dial = Dial::new();
    match mode % 5 {
        0 => {
            for chunk in body.chunks(read) {
                dial.feed(chunk);
            }
            assert!(!dial.established());
            let events = dial.client.receive_eof();
            dial.events.extend(events);
            assert_eq!(dial.client.stage(), Stage::Closed);
            assert!(dial.client.failure().is_some(), "{:?}", dial.events);
        }
        1 => {
            dial.exchange();
            assert_eq!(dial.client.stage(), Stage::Challenge, "{:?}", dial.events);
            dial.send(body, record, read);
            // Established only on a challenge and an accepted answer, in that order, and nothing else.
            let expected = match handshake::parse_challenge(body) {
                Ok(Parsed::Done { consumed, .. }) => matches!(
                    handshake::parse_answer(&body[consumed..]),
                    Ok(Parsed::Done { message: (0, _), .. })
                ),
                _ => false,
            };
            assert_eq!(dial.established(), expected, "{:?}", dial.events);
        }
        2..=4 => {
            dial.exchange();
            dial.server
                .writer()
                .write_all(&handshake::encode_challenge(&[9; 32]))
                .unwrap();
            dial.exchange();
            assert_eq!(dial.client.stage(), Stage::Answer, "{:?}", dial.events);
            let hello = handshake::parse_hello(&dial.received);
            assert!(matches!(hello, Ok(Parsed::Done { .. })), "{hello:?}");
            if mode % 5 == 2 {
                dial.send(body, record, read);
                let expected = match handshake::parse_answer(body) {
                    Ok(Parsed::Done {
                        message: (code, _), ..
                    }) => Some(code),
                    _ => None,
                };
                // An answer is at most MAX_ANSWER_LEN bytes: past that, one was decided or refused.
                if body.len() > MAX_ANSWER_LEN {
                    assert!(
                        expected.is_some() || dial.client.failure().is_some(),
                        "{:?}",
                        dial.events
                    );
                }
                match expected {
                    Some(0) => assert!(dial.established()),
                    Some(_) => assert!(dial.events.iter().any(|e| matches!(e, Event::Refused { .. }))),
                    None => assert!(!dial.established()),
                }
                return;
            }
            dial.server
                .writer()
                .write_all(&handshake::encode_answer(0, "b"))
                .unwrap();
            dial.exchange();
            assert!(dial.established(), "{:?}", dial.events);
            let packet = [0x45u8; 40];
            for _ in 0..sent {
                dial.client.send_packets([&packet[..]]).unwrap();
            }
            dial.exchange();
            assert_eq!(dial.client.counts().frames, sent);
            if mode % 5 == 3 {
                dial.send(body, record, read);
                // Acks that decode cleanly and stay within what was sent move the count; others end it.
                let mut oracle = AckDecoder::new();
                match oracle.feed(body) {
                    Ok(taken) if taken <= sent => {
                        assert_eq!(dial.client.failure(), None);
                        assert_eq!(dial.client.counts().acked, taken);
                    }
                    _ => {
                        let reason = dial.client.failure().map(Failure::reason);
                        assert!(
                            matches!(
                                reason,
                                Some("ack_beyond_sent" | "ack_regressed" | "ack_unexpected")
                            ),
                            "{reason:?}"
                        );
                    }
                }
            } else {
                for chunk in body.chunks(read) {
                    dial.feed(chunk);
                }
                assert_eq!(dial.client.counts().acked, 0);
                if let Some(reason) = dial.client.failure().map(Failure::reason) {
                    assert!(reason.starts_with("tls_"), "{reason}");
                }
            }
        }
        _ => unreachable!(),
    }
}
