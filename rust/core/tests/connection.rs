//! The connection core driven in memory: a client and a server `Connection` (and, for misbehaving peers,
//! a bare rustls client that speaks the protocol by hand) exchange their outputs until both are quiet.

mod common;

use std::io::{Read, Write};

use common::{key_file, KeyFile};
use proptest::prelude::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::ClientConnection;
use vpn_packet_core::ack::encode_ack;
use vpn_packet_core::connection::{Connection, Event, Failure, FailureTally, SendError, Stage};
use vpn_packet_core::framing::{encode_frames, encode_offload_frame_into, FrameKind, VNET_HDR_LEN};
use vpn_packet_core::handshake::{self, Answer, Hello, Parsed};
use vpn_packet_core::tls::{self, check_ca_files, NodeKey, Security};

// --- keys and certificates ---------------------------------------------------------------------------

fn keys_node(id: &str, own: &KeyFile, peers: &[(&str, &KeyFile)]) -> Security {
    Security::with_keys(id, &own.pem, peers.iter().map(|(id, k)| (*id, &k.public[..]))).unwrap()
}

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    Ca { cert, key }
}

/// A leaf issued by `ca`: subjectAltName DNS entries `sans`, subject common name `cn`.
fn leaf(ca: &Ca, sans: &[&str], cn: &str, edit: impl FnOnce(&mut CertificateParams)) -> (Vec<u8>, Vec<u8>) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    edit(&mut params);
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
}

fn ca_node(id: &str, ca: &Ca, cert: &(Vec<u8>, Vec<u8>), peers: &[&str]) -> Security {
    Security::with_ca(
        id,
        &cert.0,
        &cert.1,
        ca.cert.pem().as_bytes(),
        peers.iter().copied(),
    )
    .unwrap()
}

// --- driving two ends ------------------------------------------------------------------------------

/// What one side saw.
#[derive(Debug, Default, Clone, PartialEq)]
struct Seen {
    events: Vec<Event>,
    frames: Vec<(FrameKind, Vec<u8>)>,
}

impl Seen {
    fn established(&self) -> bool {
        self.events.iter().any(|e| matches!(e, Event::Established { .. }))
    }
    fn failure(&self) -> Option<&'static str> {
        self.events.iter().find_map(|e| match e {
            Event::Failed(f) => Some(f.reason()),
            _ => None,
        })
    }
    fn refusal(&self) -> Option<String> {
        self.events.iter().find_map(|e| match e {
            Event::Refused { reason, .. } => Some(reason.clone()),
            _ => None,
        })
    }
}

/// Feeds `data` to `conn` in pieces cut by `cuts` (positions, any order; empty: one piece).
fn feed(conn: &mut Connection, data: &[u8], cuts: &mut impl Iterator<Item = usize>, seen: &mut Seen) {
    let mut at = 0;
    while at < data.len() {
        let step = cuts.next().unwrap_or(data.len()).clamp(1, data.len() - at);
        let events = conn.receive(&data[at..at + step], |kind, payload| {
            seen.frames.push((kind, payload.to_vec()))
        });
        seen.events.extend(events);
        at += step;
    }
}

/// Moves outputs between the two until both are quiet; `cuts` split every delivery.
fn pump_with(
    client: &mut Connection,
    server: &mut Connection,
    cuts: &mut impl Iterator<Item = usize>,
    c: &mut Seen,
    s: &mut Seen,
) {
    for _ in 0..64 {
        let to_server = client.take_output();
        let to_client = server.take_output();
        if to_server.is_empty() && to_client.is_empty() {
            return;
        }
        feed(server, &to_server, cuts, s);
        feed(client, &to_client, cuts, c);
    }
    panic!("the two ends kept talking");
}

fn pump(client: &mut Connection, server: &mut Connection) -> (Seen, Seen) {
    let (mut c, mut s) = (Seen::default(), Seen::default());
    pump_with(client, server, &mut std::iter::empty(), &mut c, &mut s);
    (c, s)
}

fn connect(
    client_node: &Security,
    server_node: &Security,
    peer: &str,
) -> (Connection, Connection, Seen, Seen) {
    let mut client = Connection::client(client_node, peer, 7).unwrap();
    let mut server = Connection::server(server_node, None).unwrap();
    let (c, s) = pump(&mut client, &mut server);
    (client, server, c, s)
}

fn ipv4(n: u8, len: usize) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 9, 0, n, 10, 9, 0, 2];
    p.resize(len.max(20), n);
    p
}

// --- key mode --------------------------------------------------------------------------------------------

#[test]
fn key_mode_handshake_frames_and_acks() {
    let (ka, kb) = (key_file("a"), key_file("b"));
    let a = keys_node("a", &ka, &[("b", &kb)]);
    let b = keys_node("b", &kb, &[("a", &ka)]);
    let (mut client, mut server, c, s) = connect(&a, &b, "b");
    assert_eq!(
        c.events,
        vec![Event::Established {
            peer_id: "b".into(),
            announced_id: "b".into(),
            epoch: 7
        }]
    );
    assert_eq!(
        s.events,
        vec![Event::Established {
            peer_id: "a".into(),
            announced_id: "a".into(),
            epoch: 7
        }]
    );
    // The hybrid post-quantum group is the one negotiated.
    assert_eq!(client.key_exchange_group().as_deref(), Some("X25519MLKEM768"));
    assert_eq!(server.key_exchange_group().as_deref(), Some("X25519MLKEM768"));

    let packets: Vec<Vec<u8>> = (1..=5).map(|n| ipv4(n, 20 + 100 * n as usize)).collect();
    assert_eq!(client.send_packets(packets.iter().map(Vec::as_slice)), Ok(5));
    client.send_keepalive().unwrap();
    let (header, super_packet) = ([0u8; VNET_HDR_LEN], ipv4(9, 300));
    assert_eq!(client.send_offload(&header, &super_packet), Ok(true));
    assert_eq!(client.in_flight(), 6);
    let (c, s) = pump(&mut client, &mut server);
    assert!(c.events.is_empty() && s.events.is_empty());
    let mut expected: Vec<(FrameKind, Vec<u8>)> =
        packets.iter().map(|p| (FrameKind::Packet, p.clone())).collect();
    expected.push((FrameKind::Offload, [&header[..], &super_packet].concat()));
    assert_eq!(s.frames, expected);
    // "Sent" is what the peer acknowledged.
    assert_eq!(client.counts().acked, 6);
    assert_eq!(client.in_flight(), 0);
    assert_eq!(server.counts().frames, 6);
    assert_eq!(server.counts().keepalives, 1);
    assert_eq!(server.counts().offload_frames, 1);

    // A clean close from the client ends the server's connection as closed, not failed.
    client.close();
    let (_, s) = pump(&mut client, &mut server);
    assert_eq!(s.events, vec![Event::Closed]);
    assert_eq!(client.send_packets([&b"x"[..]]), Err(SendError::Closed));
}

#[test]
fn a_classical_client_completes_tls_with_x25519() {
    let (ka, kb) = (key_file("a"), key_file("b"));
    let a =
        Security::with_keys_and_provider("a", &ka.pem, [("b", &kb.public[..])], tls::classical_provider())
            .unwrap();
    let b = keys_node("b", &kb, &[("a", &ka)]);
    let (client, server, c, s) = connect(&a, &b, "b");
    assert!(c.established() && s.established());
    assert_eq!(client.key_exchange_group().as_deref(), Some("X25519"));
    assert_eq!(server.key_exchange_group().as_deref(), Some("X25519"));
}

#[test]
fn a_server_with_another_key_is_refused_by_the_client() {
    let (ka, kb, kc) = (key_file("a"), key_file("b"), key_file("c"));
    // a thinks b has key kb, but the server it reaches has kc.
    let a = keys_node("a", &ka, &[("b", &kb)]);
    let impostor = keys_node("b", &kc, &[("a", &ka)]);
    let (_, _, c, s) = connect(&a, &impostor, "b");
    assert_eq!(c.failure(), Some("key_mismatch"));
    assert!(!s.established());
    assert_eq!(s.failure(), Some("tls_alert"));
    // The reason names both keys.
    let Some(Event::Failed(failure)) = c.events.first() else {
        panic!("{c:?}")
    };
    assert!(failure.to_string().contains("configured public_key"), "{failure}");
}

#[test]
fn clients_are_refused_with_their_reason() {
    let (ka, kb, kx) = (key_file("a"), key_file("b"), key_file("x"));
    let a = keys_node("a", &ka, &[("b", &kb)]);
    // b knows nobody with a's key.
    let b = keys_node("b", &kb, &[("z", &kx)]);
    let (_, _, c, s) = connect(&a, &b, "b");
    assert_eq!(c.refusal().as_deref(), Some("unknown_peer"));
    assert_eq!(s.refusal().as_deref(), Some("unknown_peer"));
    // b has "a" configured with another key.
    let b = keys_node("b", &kb, &[("a", &kx)]);
    let (mut client, _, c, _) = connect(&a, &b, "b");
    assert_eq!(c.refusal().as_deref(), Some("key_mismatch"));
    assert_eq!(client.stage(), Stage::Closed);
    assert_eq!(client.send_packets([&b"x"[..]]), Err(SendError::Closed));
    // A server at its limit says so.
    let b = keys_node("b", &kb, &[("a", &ka)]);
    let mut client = Connection::client(&a, "b", 1).unwrap();
    let mut server = Connection::server(&b, Some(Answer::TooManyConnections)).unwrap();
    let (c, _) = pump(&mut client, &mut server);
    assert_eq!(c.refusal().as_deref(), Some("too_many_connections"));
    // A peer without a key cannot be dialled in key mode.
    assert_eq!(Connection::client(&a, "nobody", 1).unwrap_err().reason, "peers");
}

// --- a peer speaking the protocol by hand ------------------------------------------------------------------

/// A rustls client configured by `node` for `peer`, driven by hand.
struct Raw {
    tls: ClientConnection,
    plaintext: Vec<u8>,
}

impl Raw {
    fn new(node: &Security, peer: &str) -> Raw {
        let name = rustls::pki_types::ServerName::try_from("raw.invalid").unwrap();
        // The node's own client configuration: its verifier checks the server as a real dial would.
        Raw {
            tls: ClientConnection::new(node.client_config(peer).unwrap(), name).unwrap(),
            plaintext: Vec::new(),
        }
    }

    /// Exchanges bytes with `server` until both are quiet.
    fn pump(&mut self, server: &mut Connection, s: &mut Seen) {
        for _ in 0..64 {
            let mut to_server = Vec::new();
            while self.tls.wants_write() {
                self.tls.write_tls(&mut to_server).unwrap();
            }
            let to_client = server.take_output();
            if to_server.is_empty() && to_client.is_empty() {
                return;
            }
            feed(server, &to_server, &mut std::iter::empty(), s);
            let mut rest = &to_client[..];
            while !rest.is_empty() {
                if self.tls.read_tls(&mut rest).unwrap() == 0 {
                    break;
                }
                if self.tls.process_new_packets().is_err() {
                    break;
                }
                let _ = self.tls.reader().read_to_end(&mut self.plaintext);
            }
        }
        panic!("kept talking");
    }

    fn send(&mut self, data: &[u8]) {
        self.tls.writer().write_all(data).unwrap();
    }
}

/// A raw client that completed the handshake as `id` with `key` (its hello signed properly).
fn authenticated_raw(
    node: &Security,
    key: &KeyFile,
    id: &str,
    server_node: &Security,
    server_key: &KeyFile,
) -> (Raw, Connection, Seen) {
    let mut raw = Raw::new(node, "b");
    let mut server = Connection::server(server_node, None).unwrap();
    let mut s = Seen::default();
    raw.pump(&mut server, &mut s);
    let Ok(Parsed::Done {
        message: nonce,
        consumed,
    }) = handshake::parse_challenge(&raw.plaintext)
    else {
        panic!("no challenge: {:?}", raw.plaintext)
    };
    raw.plaintext.drain(..consumed);
    let node_key = NodeKey::from_pem(&key.pem).unwrap();
    let transcript =
        handshake::hello_transcript(&nonce, &server_key.public, id, 3, node_key.public_key()).unwrap();
    let signature = node_key.sign(&transcript).unwrap();
    let hello = handshake::encode_hello(&Hello {
        peer_id: id,
        epoch: 3,
        public_key: Some(node_key.public_key()),
        signature: Some(&signature),
    })
    .unwrap();
    raw.send(&hello);
    raw.pump(&mut server, &mut s);
    assert!(s.established(), "{s:?}");
    raw.plaintext.clear();
    (raw, server, s)
}

#[test]
fn another_version_is_answered_unsupported_version() {
    let (ka, kb) = (key_file("a"), key_file("b"));
    let a = keys_node("a", &ka, &[("b", &kb)]);
    let b = keys_node("b", &kb, &[("a", &ka)]);
    let mut raw = Raw::new(&a, "b");
    let mut server = Connection::server(&b, None).unwrap();
    let mut s = Seen::default();
    raw.pump(&mut server, &mut s);
    assert_eq!(
        handshake::parse_challenge(&raw.plaintext).map(|p| matches!(p, Parsed::Done { .. })),
        Ok(true)
    );
    raw.plaintext.clear();
    raw.send(b"VPNP\x02H\0\0\0\0\0\0\0\x01\x01a\0\0"); // a version 2 hello
    raw.pump(&mut server, &mut s);
    let Ok(Parsed::Done {
        message: (code, _), ..
    }) = handshake::parse_answer(&raw.plaintext)
    else {
        panic!("no answer: {:?}", raw.plaintext)
    };
    assert_eq!(code, Answer::UnsupportedVersion as u8);
    assert_eq!(s.failure(), Some("unsupported_version"));
}

#[test]
fn malformed_input_after_authentication_closes_that_connection_only() {
    let (ka, kb) = (key_file("a"), key_file("b"));
    let a = keys_node("a", &ka, &[("b", &kb)]);
    let b = keys_node("b", &kb, &[("a", &ka)]);
    let mut tally = FailureTally::default();

    // A length prefix above the maximum frame size, after two good frames: those two are delivered and
    // acknowledged, then the connection fails.
    let (mut raw, mut server, mut s) = authenticated_raw(&a, &ka, "a", &b, &kb);
    let mut wire = encode_frames([&ipv4(1, 40)[..], &ipv4(2, 40)], 65535).unwrap();
    wire.extend_from_slice(&0x0010_0000u32.to_be_bytes());
    raw.send(&wire);
    raw.pump(&mut server, &mut s);
    assert_eq!(s.frames.len(), 2);
    assert_eq!(s.failure(), Some("too_large"));
    assert_eq!(raw.plaintext, encode_ack(2));
    tally.record(server.failure().unwrap());

    // An offload frame whose header cannot be honoured (GSO type UFO).
    let (mut raw, mut server, mut s) = authenticated_raw(&a, &ka, "a", &b, &kb);
    let mut wire = Vec::new();
    let mut header = [0u8; VNET_HDR_LEN];
    header[1] = 3; // gso_type UDP (UFO): refused
    encode_offload_frame_into(&header, &ipv4(1, 100), &mut wire).unwrap();
    raw.send(&wire);
    raw.pump(&mut server, &mut s);
    assert!(s.frames.is_empty());
    assert_eq!(s.failure(), Some("offload_invalid"));
    tally.record(server.failure().unwrap());

    // An offload length too short for its header.
    let (mut raw, mut server, mut s) = authenticated_raw(&a, &ka, "a", &b, &kb);
    raw.send(&(0x8000_0000u32 | 4).to_be_bytes());
    raw.pump(&mut server, &mut s);
    assert_eq!(s.failure(), Some("short_offload"));
    tally.record(server.failure().unwrap());

    // A TLS record that does not decrypt (a byte of ciphertext flipped), read together with a good one
    // before it: the good record's frame is delivered and acknowledged, then the connection fails.
    let (mut raw, mut server, mut s) = authenticated_raw(&a, &ka, "a", &b, &kb);
    let mut records = Vec::new();
    raw.send(&encode_frames([&ipv4(1, 40)[..]], 65535).unwrap());
    raw.tls.write_tls(&mut records).unwrap();
    let good = records.len();
    raw.send(&encode_frames([&ipv4(2, 40)[..]], 65535).unwrap());
    raw.tls.write_tls(&mut records).unwrap();
    assert!(records.len() > good);
    let last = records.len() - 1;
    records[last] ^= 1;
    feed(&mut server, &records, &mut std::iter::empty(), &mut s);
    assert_eq!(s.frames, vec![(FrameKind::Packet, ipv4(1, 40))]);
    // rustls sends nothing after its alert, so that frame is not acknowledged (and not counted so).
    assert_eq!(server.counts().acked, 0);
    assert_eq!(s.failure(), Some("tls_bad_record"));
    tally.record(server.failure().unwrap());
    assert!(!server.output().is_empty(), "an alert is queued for the peer");

    // Garbage that is not TLS at all.
    let (_, mut server, mut s) = authenticated_raw(&a, &ka, "a", &b, &kb);
    feed(
        &mut server,
        b"GET / HTTP/1.1\r\n\r\n",
        &mut std::iter::empty(),
        &mut s,
    );
    assert_eq!(s.failure(), Some("tls_bad_record"));
    tally.record(server.failure().unwrap());
    // Nothing more is taken from a failed connection.
    let before = server.counts();
    feed(&mut server, &[0u8; 100], &mut std::iter::empty(), &mut s);
    assert_eq!(server.counts().tls_bytes_in, before.tls_bytes_in);

    let counted: Vec<_> = tally.nonzero().collect();
    assert_eq!(
        counted,
        vec![
            ("tls_bad_record", 2),
            ("too_large", 1),
            ("short_offload", 1),
            ("offload_invalid", 1)
        ]
    );
    // Every failure closed its own connection: a new one on the same node works.
    let (mut client, mut server, c, _) = connect(&a, &b, "b");
    assert!(c.established());
    client.send_packets([&ipv4(1, 60)[..]]).unwrap();
    let (_, s) = pump(&mut client, &mut server);
    assert_eq!(s.frames.len(), 1);
    assert_eq!(client.counts().acked, 1);
}

#[test]
fn a_client_sending_before_the_answer_or_closing_early_fails_by_reason() {
    let (ka, kb) = (key_file("a"), key_file("b"));
    let a = keys_node("a", &ka, &[("b", &kb)]);
    let b = keys_node("b", &kb, &[("a", &ka)]);
    // Not a hello at all: no answer, failure bad_magic.
    let mut raw = Raw::new(&a, "b");
    let mut server = Connection::server(&b, None).unwrap();
    let mut s = Seen::default();
    raw.pump(&mut server, &mut s);
    raw.plaintext.clear();
    raw.send(b"hello there");
    raw.pump(&mut server, &mut s);
    assert_eq!(s.failure(), Some("bad_magic"));
    assert!(raw.plaintext.is_empty());
    // The stream ends during the handshake.
    let mut server = Connection::server(&b, None).unwrap();
    let events = server.receive_eof();
    assert!(matches!(&events[..], [Event::Failed(Failure::ClosedEarly)]));
}

// --- CA mode ------------------------------------------------------------------------------------------

#[test]
fn ca_mode_names_decide_and_need_not_be_dns_names() {
    let ca1 = ca("test CA");
    // node-a is named by its subjectAltName; "node b" (not a DNS name) only by its common name.
    let cert_a = leaf(&ca1, &["node-a"], "ignored when a SAN is there", |_| {});
    let cert_b = leaf(&ca1, &[], "node b", |_| {});
    let a = ca_node("node-a", &ca1, &cert_a, &["node b"]);
    let b = ca_node("node b", &ca1, &cert_b, &["node-a"]);
    let (mut client, mut server, c, s) = connect(&a, &b, "node b");
    assert!(c.established(), "{c:?}");
    assert_eq!(
        s.events,
        vec![Event::Established {
            peer_id: "node-a".into(),
            announced_id: "node-a".into(),
            epoch: 7
        }]
    );
    client.send_packets([&ipv4(1, 50)[..]]).unwrap();
    let (_, s) = pump(&mut client, &mut server);
    assert_eq!(s.frames.len(), 1);
    assert_eq!(client.counts().acked, 1);

    // Dialled as "node-c", the server's certificate names "node b": the client refuses it.
    let (_, _, c, _) = connect(&a, &b, "node-c");
    assert_eq!(c.failure(), Some("identity_mismatch"));

    // A client whose certificate does not name the id it claims is refused with identity_mismatch.
    let cert_x = leaf(&ca1, &["node-x"], "node-x", |_| {});
    let liar = Security::with_ca(
        "node-x",
        &cert_x.0,
        &cert_x.1,
        ca1.cert.pem().as_bytes(),
        ["node b"],
    )
    .unwrap();
    let b_knows_x = ca_node("node b", &ca1, &cert_b, &["node-a", "node-x"]);
    let (_, _, c, _) = connect(&liar, &b_knows_x, "node b");
    assert!(c.established(), "named by its certificate, node-x is accepted");
    let mut raw = Raw::new(&liar, "node b");
    let mut server = Connection::server(&b_knows_x, None).unwrap();
    let mut s = Seen::default();
    raw.pump(&mut server, &mut s);
    raw.plaintext.clear();
    let claim = handshake::encode_hello(&Hello {
        peer_id: "node-a",
        epoch: 1,
        public_key: None,
        signature: None,
    });
    raw.send(&claim.unwrap());
    raw.pump(&mut server, &mut s);
    assert_eq!(s.refusal().as_deref(), Some("identity_mismatch"));
    let Ok(Parsed::Done {
        message: (code, text),
        ..
    }) = handshake::parse_answer(&raw.plaintext)
    else {
        panic!("no answer")
    };
    assert_eq!(code, Answer::IdentityMismatch as u8);
    assert!(text.contains("names node-x, not \"node-a\""), "{text}");
    // ... and a certificate naming two configured peers cannot be either.
    let cert_two = leaf(&ca1, &["node-a", "node-x"], "two", |_| {});
    let two = ca_node("node-a", &ca1, &cert_two, &["node b"]);
    let (_, _, c, s) = connect(&two, &b_knows_x, "node b");
    assert_eq!(c.refusal().as_deref(), Some("identity_mismatch"));
    assert_eq!(s.refusal().as_deref(), Some("identity_mismatch"));
    // An unknown id is unknown_peer.
    let (_, _, c, _) = connect(&a, &ca_node("node b", &ca1, &cert_b, &["someone"]), "node b");
    assert_eq!(c.refusal().as_deref(), Some("unknown_peer"));

    // A certificate from another CA: the server's webpki refuses the client in TLS.
    let ca2 = ca("other CA");
    let cert_o = leaf(&ca2, &["node-a"], "node-a", |_| {});
    let other = ca_node("node-a", &ca2, &cert_o, &["node b"]);
    let (_, _, c, s) = connect(&other, &b, "node b");
    assert!(!c.established());
    assert_eq!(c.failure(), Some("tls_certificate")); // it does not trust b's CA either
    assert!(s.failure().is_some());
}

#[test]
fn ca_files_webpki_refuses_are_named_at_start() {
    let ca1 = ca("test CA");
    let ca_pem = ca1.cert.pem();
    let expired = leaf(&ca1, &["a"], "a", |p| {
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(2001, 1, 1);
    });
    let err = check_ca_files(&expired.0, &expired.1, ca_pem.as_bytes()).unwrap_err();
    assert_eq!(err.reason, "certificate_refused");
    assert!(err.to_string().contains("expired"), "{err}");
    let ca2 = ca("other CA");
    let foreign = leaf(&ca2, &["a"], "a", |_| {});
    let err = check_ca_files(&foreign.0, &foreign.1, ca_pem.as_bytes()).unwrap_err();
    assert_eq!(err.reason, "certificate_refused");
    let good = leaf(&ca1, &["a"], "a", |_| {});
    assert_eq!(
        check_ca_files(&good.0, &foreign.1, ca_pem.as_bytes())
            .unwrap_err()
            .reason,
        "key_file"
    );
    assert_eq!(check_ca_files(&good.0, &good.1, b"").unwrap_err().reason, "ca");
    assert!(check_ca_files(&good.0, &good.1, ca_pem.as_bytes()).is_ok());
    // A node whose own certificate does not name its id is told so at start.
    let err = Security::with_ca("b", &good.0, &good.1, ca_pem.as_bytes(), ["a"]).unwrap_err();
    assert_eq!(err.reason, "certificate_refused");
    assert!(err.to_string().contains("names a, not its id \"b\""), "{err}");
}

#[test]
fn key_files_are_checked() {
    let k = key_file("a");
    let other = key_file("b");
    // A key with another key's certificate.
    let text = String::from_utf8(k.pem.clone()).unwrap();
    let other_text = String::from_utf8(other.pem.clone()).unwrap();
    let key_part = &text[..text.find("-----BEGIN CERTIFICATE").unwrap()];
    let cert_part = &other_text[other_text.find("-----BEGIN CERTIFICATE").unwrap()..];
    let err = NodeKey::from_pem(format!("{key_part}{cert_part}").as_bytes()).unwrap_err();
    assert!(
        err.to_string().contains("not the one of this private key"),
        "{err}"
    );
    assert_eq!(
        NodeKey::from_pem(key_part.as_bytes()).unwrap_err().reason,
        "key_file"
    );
    assert_eq!(NodeKey::from_pem(b"nothing").unwrap_err().reason, "key_file");
}

// --- any read boundaries give the same result --------------------------------------------------------------

fn run_split(cuts: Vec<usize>, packets: &[Vec<u8>]) -> (Seen, Seen, u64) {
    use std::sync::OnceLock;
    static NODES: OnceLock<(Security, Security)> = OnceLock::new();
    let (a, b) = NODES.get_or_init(|| {
        let (ka, kb) = (key_file("a"), key_file("b"));
        (
            keys_node("a", &ka, &[("b", &kb)]),
            keys_node("b", &kb, &[("a", &ka)]),
        )
    });
    run_split_between(a, b, cuts, packets)
}

/// A run of packets through a connection pair with reads cut at `cuts`: what each side saw, and the acks.
type SplitRun = fn(Vec<usize>, &[Vec<u8>]) -> (Seen, Seen, u64);

/// `run` delivers packets of `sizes` whole, in order, all acknowledged, whatever the read boundaries.
fn same_result(run: SplitRun, cuts: Vec<usize>, sizes: &[usize]) -> Result<(), TestCaseError> {
    let packets: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| ipv4(i as u8, n)).collect();
    let (c, s, acked) = run(cuts, &packets);
    prop_assert!(c.established() && s.established());
    let got: Vec<Vec<u8>> = s.frames.into_iter().map(|(_, p)| p).collect();
    prop_assert_eq!(got, packets.clone());
    prop_assert_eq!(acked, packets.len() as u64);
    Ok(())
}

/// Node `a` dials `b` and sends `packets` in batches of 3, every read cut at the next of `cuts`.
fn run_split_between(a: &Security, b: &Security, cuts: Vec<usize>, packets: &[Vec<u8>]) -> (Seen, Seen, u64) {
    let mut client = Connection::client(a, "b", 1).unwrap();
    let mut server = Connection::server_with_nonce(b, None, [4; 32]).unwrap();
    let (mut c, mut s) = (Seen::default(), Seen::default());
    let mut cuts = cuts.into_iter().cycle();
    pump_with(&mut client, &mut server, &mut cuts, &mut c, &mut s);
    for batch in packets.chunks(3) {
        client.send_packets(batch.iter().map(Vec::as_slice)).unwrap();
        pump_with(&mut client, &mut server, &mut cuts, &mut c, &mut s);
        assert!(server.buffered() <= 4 + 65_545 + 512);
    }
    (c, s, client.counts().acked)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn any_read_boundaries_give_the_same_result(
        cuts in prop::collection::vec(1usize..700, 1..12),
        sizes in prop::collection::vec(20usize..3000, 0..12),
    ) {
        same_result(run_split, cuts, &sizes)?;
    }
}

// --- whatever a peer sends: no panic, memory within the bound, a failure has a known reason ----------------

/// The most a connection holds between calls: a handshake message, one partial frame, an ack record.
const BUFFER_BOUND: usize = handshake::MAX_HELLO_LEN + 4 + 65_545 + 9;

fn check_bounded(server: &Connection) {
    assert!(server.buffered() <= BUFFER_BOUND);
    if let Some(failure) = server.failure() {
        assert!(Failure::REASONS.contains(&failure.reason()), "{failure:?}");
        assert_eq!(server.stage(), Stage::Closed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn bytes_before_authentication_never_authenticate(
        data in prop::collection::vec(any::<u8>(), 0..3000),
        step in 1usize..200,
        tls_like: bool,
    ) {
        static NODE: std::sync::OnceLock<Security> = std::sync::OnceLock::new();
        let node = NODE.get_or_init(|| {
            let (kb, ka) = (key_file("b"), key_file("a"));
            keys_node("b", &kb, &[("a", &ka)])
        });
        let mut server = Connection::server(node, None).unwrap();
        // Half the cases start like a TLS handshake record, to get past the first check.
        let data = if tls_like { [&[0x16, 3, 1, 0x0b, 0xb8][..], &data].concat() } else { data };
        for chunk in data.chunks(step) {
            let events = server.receive(chunk, |_, _| panic!("a frame before authentication"));
            let authenticated = events.iter().any(|e| matches!(e, Event::Established { .. }));
            prop_assert!(!authenticated);
            check_bounded(&server);
        }
    }

    #[test]
    fn plaintext_from_an_authenticated_peer_is_taken_or_refused_by_reason(
        head in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..200), 0..4),
        tail in prop::collection::vec(any::<u8>(), 0..300),
        step in 1usize..300,
    ) {
        static NODES: std::sync::OnceLock<(Security, Security, KeyFile, KeyFile)> = std::sync::OnceLock::new();
        let (a, b, ka, kb) = NODES.get_or_init(|| {
            let (ka, kb) = (key_file("a"), key_file("b"));
            (keys_node("a", &ka, &[("b", &kb)]), keys_node("b", &kb, &[("a", &ka)]), ka, kb)
        });
        let (mut raw, mut server, mut s) = authenticated_raw(a, ka, "a", b, kb);
        // Some valid frames, then arbitrary bytes, in records of `step` bytes.
        let mut plaintext = encode_frames(head.iter().map(Vec::as_slice), 65535).unwrap();
        plaintext.extend_from_slice(&tail);
        for chunk in plaintext.chunks(step) {
            raw.send(chunk);
            raw.pump(&mut server, &mut s);
            check_bounded(&server);
        }
        prop_assert!(s.frames.len() >= head.len());
        prop_assert_eq!(server.counts().frames, s.frames.len() as u64);
        // Every frame taken was acknowledged, also when the connection failed after taking it.
        prop_assert_eq!(server.counts().acked, s.frames.len() as u64);
    }
}

#[test]
fn a_server_acknowledging_more_than_was_sent_is_caught() {
    let (ka, kb) = (key_file("a"), key_file("b"));
    let a = keys_node("a", &ka, &[("b", &kb)]);
    let b = keys_node("b", &kb, &[("a", &ka)]);
    for (acks, reason) in [
        (encode_ack(3).to_vec(), "ack_beyond_sent"),
        ([encode_ack(1), encode_ack(0)].concat(), "ack_regressed"),
        (b"VPNP".to_vec(), "ack_unexpected"),
    ] {
        let mut client = Connection::client(&a, "b", 1).unwrap();
        let mut server = rustls::ServerConnection::new(b.server_config().unwrap()).unwrap();
        let mut c = Seen::default();
        let mut plaintext = Vec::new();
        let mut said = false;
        for _ in 0..16 {
            let mut rest = &client.take_output()[..];
            while !rest.is_empty() && server.read_tls(&mut rest).unwrap() > 0 {
                server.process_new_packets().unwrap();
                let _ = server.reader().read_to_end(&mut plaintext);
            }
            if !server.is_handshaking() && !said {
                said = true;
                server
                    .writer()
                    .write_all(&handshake::encode_challenge(&[1; 32]))
                    .unwrap();
            }
            if matches!(handshake::parse_hello(&plaintext), Ok(Parsed::Done { .. })) {
                plaintext.clear();
                server
                    .writer()
                    .write_all(&handshake::encode_answer(0, "b"))
                    .unwrap();
                server.writer().write_all(&acks).unwrap();
            }
            let mut to_client = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut to_client).unwrap();
            }
            feed(&mut client, &to_client, &mut std::iter::empty(), &mut c);
            if client.stage() == Stage::Established {
                client.send_packets([&ipv4(1, 40)[..]]).unwrap();
            }
        }
        assert!(c.established());
        assert_eq!(c.failure(), Some(reason), "{c:?}");
    }
}

// --- insecure mode: the same stages and checks over plaintext ------------------------------------------------

fn insecure_node(id: &str, peers: &[&str]) -> Security {
    Security::insecure(id, peers.iter().copied()).unwrap()
}

#[test]
fn insecure_mode_speaks_the_version_3_messages_in_plaintext() {
    let a = insecure_node("a", &["b"]);
    let b = insecure_node("b", &["a"]);
    let mut client = Connection::client(&a, "b", 7).unwrap();
    let mut server = Connection::server_with_nonce(&b, None, [5; 32]).unwrap();
    assert!(!client.encrypted() && !server.encrypted());
    // The server speaks first: its challenge, as the bytes on the wire; the client waits for it.
    assert!(client.output().is_empty());
    assert_eq!(client.stage(), Stage::Challenge);
    assert_eq!(server.take_output(), handshake::encode_challenge(&[5; 32]));
    let mut c = Seen::default();
    feed(
        &mut client,
        &handshake::encode_challenge(&[5; 32]),
        &mut std::iter::empty(),
        &mut c,
    );
    let hello = handshake::encode_hello(&Hello {
        peer_id: "a",
        epoch: 7,
        public_key: None,
        signature: None,
    })
    .unwrap();
    assert_eq!(client.take_output(), hello);
    let mut s = Seen::default();
    feed(&mut server, &hello, &mut std::iter::empty(), &mut s);
    assert_eq!(
        s.events,
        vec![Event::Established {
            peer_id: "a".into(),
            announced_id: "a".into(),
            epoch: 7
        }]
    );
    assert_eq!(
        server.take_output(),
        handshake::encode_answer(Answer::Accepted as u8, "b")
    );
    feed(
        &mut client,
        &handshake::encode_answer(0, "b"),
        &mut std::iter::empty(),
        &mut c,
    );
    assert!(c.established());
    assert_eq!(client.key_exchange_group(), None);
    assert!(client.peer_names().is_empty());

    // Frames are the framing's bytes as they are; acks likewise.
    let packets: Vec<Vec<u8>> = (1..=5).map(|n| ipv4(n, 20 + 100 * n as usize)).collect();
    assert_eq!(client.send_packets(packets.iter().map(Vec::as_slice)), Ok(5));
    let framed = client.take_output();
    assert_eq!(
        framed,
        encode_frames(packets.iter().map(Vec::as_slice), 65535).unwrap()
    );
    let mut s = Seen::default();
    feed(&mut server, &framed, &mut std::iter::empty(), &mut s);
    assert_eq!(server.take_output(), encode_ack(5));
    feed(
        &mut client,
        &encode_ack(5),
        &mut std::iter::empty(),
        &mut Seen::default(),
    );
    assert_eq!(client.in_flight(), 0);
    client.send_keepalive().unwrap();
    let (header, super_packet) = ([0u8; VNET_HDR_LEN], ipv4(9, 300));
    assert_eq!(client.send_offload(&header, &super_packet), Ok(true));
    assert_eq!(client.in_flight(), 1);
    let (c, s) = pump(&mut client, &mut server);
    assert!(c.events.is_empty() && s.events.is_empty());
    assert_eq!(
        s.frames,
        vec![(FrameKind::Offload, [&header[..], &super_packet].concat())]
    );
    assert_eq!(client.counts().acked, 6);
    assert_eq!(
        (server.counts().keepalives, server.counts().offload_frames),
        (1, 1)
    );
    // Acks of frames that arrive in the same read as the hello go out with the answer.
    let mut client = Connection::client(&a, "b", 8).unwrap();
    let mut server = Connection::server(&b, None).unwrap();
    let mut s = Seen::default();
    feed(
        &mut client,
        &server.take_output(),
        &mut std::iter::empty(),
        &mut Seen::default(),
    );
    let mut wire = client.take_output();
    wire.extend(encode_frames([&ipv4(1, 40)[..]], 65535).unwrap());
    feed(&mut server, &wire, &mut std::iter::empty(), &mut s);
    assert!(s.established());
    assert_eq!(s.frames.len(), 1);
    let mut answer_and_ack = handshake::encode_answer(0, "b");
    answer_and_ack.extend_from_slice(&encode_ack(1));
    assert_eq!(server.take_output(), answer_and_ack);
    // The end of the stream after the handshake is a close, before it a failure.
    assert_eq!(server.receive_eof(), vec![Event::Closed]);
    let mut early = Connection::server(&b, None).unwrap();
    assert!(matches!(
        &early.receive_eof()[..],
        [Event::Failed(Failure::ClosedEarly)]
    ));
}

#[test]
fn insecure_mode_refuses_with_the_plaintext_rules() {
    let a = insecure_node("a", &["b"]);
    // A peer is the configured id it claims: b does not know "a".
    let b = insecure_node("b", &["z"]);
    let (mut client, _, c, s) = connect(&a, &b, "b");
    assert_eq!(c.refusal().as_deref(), Some("unknown_peer"));
    assert_eq!(s.refusal().as_deref(), Some("unknown_peer"));
    assert_eq!(client.send_packets([&b"x"[..]]), Err(SendError::Closed));
    // A peer added in place is accepted from the next hello on (a reload, discovery).
    let b = insecure_node("b", &[]);
    let (_, _, c, _) = connect(&a, &b, "b");
    assert_eq!(c.refusal().as_deref(), Some("unknown_peer"));
    if let tls::Trust::Insecure { peers } = b.trust() {
        peers.update(["a"], []);
    }
    let (_, _, c, s) = connect(&a, &b, "b");
    assert!(c.established() && s.established());
    // A server at its limit, or stopping, says so.
    let mut client = Connection::client(&a, "b", 1).unwrap();
    let mut server = Connection::server(&b, Some(Answer::TooManyConnections)).unwrap();
    let (c, _) = pump(&mut client, &mut server);
    assert_eq!(c.refusal().as_deref(), Some("too_many_connections"));
    // An insecure node has no TLS configuration to hand out.
    assert!(b.client_config("a").is_err() && b.server_config().is_err());
}

/// A plaintext server's answer to `data` sent after its challenge: the failure reason, and the answer's
/// reason when it sent one.
fn plaintext_server_answer(data: &[u8]) -> (Option<&'static str>, Option<&'static str>) {
    let b = insecure_node("b", &["a"]);
    let mut server = Connection::server(&b, None).unwrap();
    server.take_output();
    let mut s = Seen::default();
    feed(&mut server, data, &mut std::iter::empty(), &mut s);
    assert_eq!(server.stage(), Stage::Closed);
    let out = server.take_output();
    let answer = match handshake::parse_answer(&out) {
        Ok(Parsed::Done {
            message: (code, _), ..
        }) => Answer::from_code(code).map(Answer::reason),
        _ => {
            assert!(out.is_empty(), "{out:?}");
            None
        }
    };
    (s.failure(), answer)
}

#[test]
fn insecure_mode_tells_wire_errors_apart() {
    // A TLS client at an insecure node: no answer (it could not read one).
    assert_eq!(
        plaintext_server_answer(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
        (Some("tls_expected_plaintext"), None)
    );
    assert_eq!(
        plaintext_server_answer(b"GET / HTTP/1.1\r\n"),
        (Some("bad_magic"), None)
    );
    // Another version is told so; a malformed hello is answered bad_hello and counted by what is wrong.
    assert_eq!(
        plaintext_server_answer(b"VPNP\x02H\0\0\0\0\0\0\0\x01\x01a\0\0"),
        (Some("unsupported_version"), Some("unsupported_version"))
    );
    assert_eq!(
        plaintext_server_answer(b"VPNP\x03H\0\0\0\0\0\0\0\x01\x01a\x05\0\0\0\0\0"),
        (Some("bad_field_length"), Some("bad_hello"))
    );
    assert_eq!(
        plaintext_server_answer(b"VPNP\x03C"),
        (Some("unexpected_message"), Some("bad_hello"))
    );
}

fn run_split_insecure(cuts: Vec<usize>, packets: &[Vec<u8>]) -> (Seen, Seen, u64) {
    let (a, b) = (insecure_node("a", &["b"]), insecure_node("b", &["a"]));
    run_split_between(&a, &b, cuts, packets)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn insecure_any_read_boundaries_give_the_same_result(
        cuts in prop::collection::vec(1usize..700, 1..12),
        sizes in prop::collection::vec(20usize..3000, 0..12),
    ) {
        same_result(run_split_insecure, cuts, &sizes)?;
    }

    #[test]
    fn insecure_bytes_before_the_hello_never_authenticate_unless_a_hello(
        data in prop::collection::vec(any::<u8>(), 0..3000),
        step in 1usize..200,
    ) {
        let b = insecure_node("b", &["a"]);
        let mut server = Connection::server(&b, None).unwrap();
        for chunk in data.chunks(step) {
            let events = server.receive(chunk, |_, _| {});
            for event in &events {
                // Only a well-formed hello of a configured id is accepted (arbitrary bytes hardly are).
                if let Event::Established { peer_id, .. } = event {
                    prop_assert_eq!(peer_id.as_str(), "a");
                }
            }
            check_bounded(&server);
        }
    }

    #[test]
    fn insecure_bytes_from_an_established_peer_are_taken_or_refused_by_reason(
        head in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..200), 0..4),
        tail in prop::collection::vec(any::<u8>(), 0..300),
        step in 1usize..300,
    ) {
        let b = insecure_node("b", &["a"]);
        let mut server = Connection::server(&b, None).unwrap();
        server.take_output();
        let hello = handshake::encode_hello(&Hello { peer_id: "a", epoch: 1, public_key: None, signature: None })
            .unwrap();
        let mut s = Seen::default();
        feed(&mut server, &hello, &mut std::iter::empty(), &mut s);
        prop_assert!(s.established());
        server.take_output();
        let mut wire = encode_frames(head.iter().map(Vec::as_slice), 65535).unwrap();
        wire.extend_from_slice(&tail);
        let mut acks = Vec::new();
        for chunk in wire.chunks(step) {
            feed(&mut server, chunk, &mut std::iter::empty(), &mut s);
            acks.extend(server.take_output());
            check_bounded(&server);
        }
        prop_assert!(s.frames.len() >= head.len());
        prop_assert_eq!(server.counts().frames, s.frames.len() as u64);
        // Every frame taken was acknowledged, also when the connection failed after taking it, and the
        // acks on the wire say so.
        prop_assert_eq!(server.counts().acked, s.frames.len() as u64);
        let mut decoder = vpn_packet_core::ack::AckDecoder::new();
        let last = decoder.feed(&acks).unwrap_or(0);
        prop_assert_eq!(last, s.frames.len() as u64);
    }
}
