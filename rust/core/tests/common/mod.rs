//! What the connection, send and receive tests share: node keys as `vpn-packet genkey` writes them, and a
//! minimal IPv4 packet. (A module of each test crate that declares it, not a test crate of its own.)

use rcgen::{CertificateParams, DnType, KeyPair, PKCS_ED25519};
use vpn_packet_core::tls::NodeKey;

/// A key file as `vpn-packet genkey` writes one: PKCS#8 Ed25519 key, then its self-signed certificate.
pub struct KeyFile {
    pub pem: Vec<u8>,
    pub public: [u8; 32],
}

/// A fresh key file for node `name`.
pub fn key_file(name: &str) -> KeyFile {
    let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    let pem = format!("{}{}", key.serialize_pem(), cert.pem()).into_bytes();
    let public = *NodeKey::from_pem(&pem).unwrap().public_key();
    KeyFile { pem, public }
}

/// A 21-byte IPv4/UDP packet from `src` to 10.9.0.2 whose last byte is `seq`.
#[allow(dead_code)] // the connection tests build their own packets
pub fn ipv4_from(src: [u8; 4], seq: u8) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 21, 0, 0, 0, 0, 64, 17, 0, 0];
    p.extend_from_slice(&src);
    p.extend_from_slice(&[10, 9, 0, 2, seq]);
    p
}
