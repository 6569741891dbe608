//! Fuzzes the connection core with what a peer may send. The first byte picks the attacker:
//!
//! - even: anyone, before authentication: arbitrary bytes as TLS records to a fresh server;
//! - odd: an authenticated peer: a client that completed TLS and the signed hello, then sends arbitrary
//!   plaintext (frames, offload headers, garbage) inside TLS, cut at the boundaries the next bytes pick.
//!
//! Nothing may panic; memory stays within the documented bound; a failure has a reason of
//! `Failure::REASONS`; the server acknowledges exactly the frames it handed to the sink.
#![no_main]

use std::io::{Read, Write};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rcgen::{CertificateParams, DnType, KeyPair, PKCS_ED25519};
use rustls::ClientConnection;
use vpn_packet_core::connection::{Connection, Event, Failure, Stage, MAX_OUTPUT};
use vpn_packet_core::handshake::{self, Hello, Parsed};
use vpn_packet_core::tls::{NodeKey, Security};

/// The most a server connection holds: a handshake message, one partial frame, an ack record.
const BUFFER_BOUND: usize = handshake::MAX_HELLO_LEN + 4 + 65_545 + 9;

struct Nodes {
    client: Security,
    server: Security,
    client_key: NodeKey,
    server_public: [u8; 32],
}

fn key_file(name: &str) -> Vec<u8> {
    let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    format!("{}{}", key.serialize_pem(), cert.pem()).into_bytes()
}

fn nodes() -> &'static Nodes {
    static NODES: OnceLock<Nodes> = OnceLock::new();
    NODES.get_or_init(|| {
        let (a, b) = (key_file("a"), key_file("b"));
        let (ka, kb) = (NodeKey::from_pem(&a).unwrap(), NodeKey::from_pem(&b).unwrap());
        Nodes {
            client: Security::with_keys("a", &a, [("b", &kb.public_key()[..])]).unwrap(),
            server: Security::with_keys("b", &b, [("a", &ka.public_key()[..])]).unwrap(),
            server_public: *kb.public_key(),
            client_key: ka,
        }
    })
}

fn check(server: &Connection, frames: u64) {
    assert!(server.buffered() <= BUFFER_BOUND);
    assert!(server.output().len() <= MAX_OUTPUT);
    assert_eq!(server.counts().frames, frames);
    if let Some(failure) = server.failure() {
        assert!(Failure::REASONS.contains(&failure.reason()));
        assert_eq!(server.stage(), Stage::Closed);
    }
}

/// Moves bytes between a rustls client and the server until both are quiet; returns the plaintext.
fn exchange(tls: &mut ClientConnection, server: &mut Connection) -> Vec<u8> {
    let mut plaintext = Vec::new();
    for _ in 0..32 {
        let mut to_server = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut to_server).unwrap();
        }
        let to_client = server.take_output();
        if to_server.is_empty() && to_client.is_empty() {
            break;
        }
        let _ = server.receive(&to_server, |_, _| {});
        let mut rest = &to_client[..];
        while !rest.is_empty() && tls.read_tls(&mut rest).unwrap_or(0) > 0 {
            if tls.process_new_packets().is_err() {
                break;
            }
            let _ = tls.reader().read_to_end(&mut plaintext);
        }
    }
    plaintext
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let nodes = nodes();
    let mut server = Connection::server(&nodes.server, None).unwrap();
    if mode % 2 == 0 {
        for chunk in data.chunks(usize::from(mode / 2) + 1) {
            let events = server.receive(chunk, |_, _| panic!("a frame before authentication"));
            assert!(!events.iter().any(|e| matches!(e, Event::Established { .. })));
            check(&server, 0);
        }
        return;
    }
    let name = rustls::pki_types::ServerName::try_from("fuzz.invalid").unwrap();
    let mut tls = ClientConnection::new(nodes.client.client_config("b").unwrap(), name).unwrap();
    let plaintext = exchange(&mut tls, &mut server);
    let Ok(Parsed::Done { message: nonce, .. }) = handshake::parse_challenge(&plaintext) else {
        panic!("no challenge");
    };
    let key = nodes.client_key.public_key();
    let transcript = handshake::hello_transcript(&nonce, &nodes.server_public, "a", 1, key).unwrap();
    let signature = nodes.client_key.sign(&transcript).unwrap();
    let hello = Hello { peer_id: "a", epoch: 1, public_key: Some(key), signature: Some(&signature) };
    tls.writer().write_all(&handshake::encode_hello(&hello).unwrap()).unwrap();
    exchange(&mut tls, &mut server);
    assert_eq!(server.stage(), Stage::Established);
    // The plaintext is sent in records cut where `mode` says, each fed to the server whole.
    let step = usize::from(mode / 2) * 37 + 1;
    let mut frames = 0u64;
    for chunk in data.chunks(step) {
        tls.writer().write_all(chunk).unwrap();
        let mut records = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut records).unwrap();
        }
        let _ = server.receive(&records, |kind, payload| {
            assert!(!payload.is_empty());
            let _ = kind;
            frames += 1;
        });
        check(&server, frames);
    }
});
