//! How long a connection handshake takes in memory (TLS 1.3 + challenge, signed hello, answer), with the
//! hybrid post-quantum group (X25519MLKEM768) and with X25519 alone: a timing to report, not a test.
//!
//! cargo run --release -p vpn-packet-core --example handshake_timing [ROUNDS]

use std::time::{Duration, Instant};

use rcgen::{CertificateParams, DnType, KeyPair, PKCS_ED25519};
use vpn_packet_core::connection::{Connection, Event};
use vpn_packet_core::tls::{self, NodeKey, Security};

fn key_file(name: &str) -> (Vec<u8>, [u8; 32]) {
    let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = format!(
        "{}{}",
        key.serialize_pem(),
        params.self_signed(&key).unwrap().pem()
    )
    .into_bytes();
    let public = *NodeKey::from_pem(&pem).unwrap().public_key();
    (pem, public)
}

/// One handshake; returns its time and the bytes both sides wrote.
fn handshake(a: &Security, b: &Security) -> (Duration, usize) {
    let start = Instant::now();
    let mut client = Connection::client(a, "b", 1).unwrap();
    let mut server = Connection::server(b, None).unwrap();
    let mut bytes = 0;
    let mut established = 0;
    while established < 2 {
        let (to_server, to_client) = (client.take_output(), server.take_output());
        assert!(!(to_server.is_empty() && to_client.is_empty()), "stalled");
        bytes += to_server.len() + to_client.len();
        for event in server
            .receive(&to_server, |_, _| {})
            .into_iter()
            .chain(client.receive(&to_client, |_, _| {}))
        {
            assert!(matches!(event, Event::Established { .. }), "{event:?}");
            established += 1;
        }
    }
    (start.elapsed(), bytes)
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(300);
    let ((pa, ka), (pb, kb)) = (key_file("a"), key_file("b"));
    let b = Security::with_keys("b", &pb, [("a", &ka[..])]).unwrap();
    let hybrid = Security::with_keys("a", &pa, [("b", &kb[..])]).unwrap();
    let classical =
        Security::with_keys_and_provider("a", &pa, [("b", &kb[..])], tls::classical_provider()).unwrap();
    for (name, a) in [("X25519MLKEM768", &hybrid), ("X25519", &classical)] {
        for _ in 0..20 {
            handshake(a, &b); // warm up
        }
        let mut times: Vec<Duration> = Vec::with_capacity(rounds);
        let mut bytes = 0;
        for _ in 0..rounds {
            let (t, n) = handshake(a, &b);
            times.push(t);
            bytes = n;
        }
        times.sort_unstable();
        let mean = times.iter().sum::<Duration>() / rounds as u32;
        println!(
            "{name:>15}: {rounds} handshakes, median {:.3} ms, mean {:.3} ms, p90 {:.3} ms, {bytes} bytes on the wire",
            times[rounds / 2].as_secs_f64() * 1e3,
            mean.as_secs_f64() * 1e3,
            times[rounds * 9 / 10].as_secs_f64() * 1e3,
        );
    }
}
