//! Fuzzes the offload core: a virtio-net header and a packet from arbitrary bytes. Nothing may panic,
//! `validate` must agree with `segment`, a refusal writes nothing, and segments must account for every byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vpn_packet_core::gso::{complete_checksum, segment, validate, VirtioNetHdr, MAX_HEADER_LEN, MAX_SEGMENTS};

fuzz_target!(|data: &[u8]| {
    let Ok((hdr, packet)) = VirtioNetHdr::split(data) else {
        assert!(data.len() < VirtioNetHdr::LEN);
        return;
    };
    let mut out = Vec::new();
    let mut lengths = Vec::new();
    let result = segment(&hdr, packet, &mut out, &mut lengths);
    assert_eq!(validate(&hdr, packet), result);
    match result {
        Ok(n) => {
            assert!((1..=MAX_SEGMENTS).contains(&n));
            assert_eq!(lengths.len(), n);
            let total: usize = lengths.iter().map(|&l| l as usize).sum();
            assert_eq!(total, out.len());
            // Each segment repeats the same headers and carries a distinct part of the payload.
            let extra = total - packet.len();
            if n > 1 {
                assert_eq!(extra % (n - 1), 0);
                assert!(extra / (n - 1) <= MAX_HEADER_LEN);
            } else {
                assert_eq!(extra, 0);
            }
        }
        Err(err) => {
            assert!(out.is_empty() && lengths.is_empty());
            assert!(!err.reason().is_empty());
        }
    }
    let mut copy = packet.to_vec();
    if complete_checksum(&hdr, &mut copy).is_err() {
        assert_eq!(copy, packet);
    }
});
