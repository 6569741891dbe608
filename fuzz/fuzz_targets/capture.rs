//! Fuzzes the capture reader: any bytes give batches then an end or a typed error, never a panic or a hang.
//!
//! Besides the raw bytes (format sniffing, gzip, pcap, pcapng), the input is also wrapped so that the fuzzer
//! reaches the deeper paths without having to discover a valid container first: as one frame of a chosen link
//! type (the link-layer and encapsulation walk: VLAN, MPLS, PPPoE, LLC/SNAP, PBB), as the frames of a legacy
//! pcap file, as obsolete pcapng Packet Blocks and blocks of any type, and inside a valid gzip stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vpn_packet_core::capture::{strip_link, Batch, CaptureReader, Encapsulations, LinkPayload, ReaderOptions};

/// Link types worth steering to (supported ones, and one that is not).
const LINKS: [u16; 13] = [0, 1, 9, 12, 50, 51, 101, 104, 108, 113, 228, 276, 105];

/// Reads `input` to its end; checks the counters' invariants and that the reader stays done after an error.
fn drain(input: &[u8], options: ReaderOptions) {
    let Ok(mut reader) = CaptureReader::with_options(input, options) else { return };
    let mut batch = Batch::default();
    let mut packets = 0u64;
    // Each successful call consumes input, so this ends; the bound guards against a regression that loops.
    for _ in 0..=input.len() + 1 {
        match reader.next_batch(&mut batch) {
            Ok(true) => {
                assert!(!batch.is_empty() && batch.len() <= options.batch_packets.max(1));
                packets += batch.len() as u64;
                for packet in batch.packets() {
                    let _ = vpn_packet_core::extract(packet);
                }
            }
            Ok(false) | Err(_) => {
                assert!(!reader.next_batch(&mut batch).unwrap_or(true), "a reader stays done");
                let s = reader.stats();
                assert_eq!(s.frames, s.ip_packets + s.non_ip_frames + s.short_frames + s.unsupported_link_frames);
                assert_eq!(s.ip_packets, packets);
                assert!(s.encapsulations.values().all(|&n| n <= s.frames));
                return;
            }
        }
    }
    panic!("capture reader did not finish {} bytes of input", input.len());
}

fn small() -> ReaderOptions {
    ReaderOptions { batch_packets: 3, batch_bytes: 64, buffer_capacity: 4096, max_record: 8192 }
}

/// A legacy little-endian pcap file of link type `link` whose records are `frames`.
fn pcap(link: u16, frames: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0];
    out.extend_from_slice(&u32::from(link).to_le_bytes());
    for frame in frames {
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        out.extend_from_slice(frame);
    }
    out
}

/// A pcapng block: type, total length, body padded to 4 bytes, total length (little-endian).
fn block(kind: u32, body: &[u8]) -> Vec<u8> {
    let padded = body.len().div_ceil(4) * 4;
    let total = (12 + padded) as u32;
    let mut out = kind.to_le_bytes().to_vec();
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(body);
    out.resize(8 + padded, 0);
    out.extend_from_slice(&total.to_le_bytes());
    out
}

/// A pcapng file: a section, an interface of link type `link`, then each frame as an obsolete Packet Block
/// (type 2) or, when `kinds` says so, as a block of a fuzz-chosen type.
fn pcapng(link: u16, frames: &[&[u8]], kinds: &[u8]) -> Vec<u8> {
    let mut out = block(0x0a0d_0d0a, &[0x4d, 0x3c, 0x2b, 0x1a, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    out.extend(block(1, &[&link.to_le_bytes()[..], &[0, 0, 0, 0, 0, 0]].concat()));
    for (i, frame) in frames.iter().enumerate() {
        match kinds.get(i).copied().unwrap_or(0) % 8 {
            0..=4 => {
                let mut body = vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                body.extend_from_slice(&(frame.len() as u32).to_le_bytes());
                body.extend_from_slice(&(frame.len() as u32).to_le_bytes());
                body.extend_from_slice(frame);
                out.extend(block(2, &body));
            }
            5 => out.extend(block(4, frame)),
            6 => out.extend(block(0x0bad, frame)),
            _ => out.extend(block(u32::from(kinds[i]) << 8 | 0x40, frame)),
        }
    }
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { crc >> 1 ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A valid gzip stream holding `data` in stored (uncompressed) deflate blocks: reaching the reader behind
/// the decoder without the fuzzer having to produce valid deflate.
fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let mut chunks = data.chunks(0xffff).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        out.push(u8::from(chunks.peek().is_none()));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fuzz_target!(|data: &[u8]| {
    drain(data, ReaderOptions::default());
    drain(data, small());
    let Some((&selector, rest)) = data.split_first() else { return };
    let link = LINKS[usize::from(selector) % LINKS.len()];

    // The rest as one frame: the IP packet, when there is one, is a suffix of the frame.
    let mut layers = Encapsulations::default();
    if let LinkPayload::Ip(packet) = strip_link(link, rest, &mut layers) {
        assert!(rest.ends_with(packet));
    }

    // The rest cut into frames at a few data-derived places, in containers.
    let cut = usize::from(rest.first().copied().unwrap_or(0)).min(rest.len());
    let (first, second) = rest.split_at(cut);
    let frames = [first, second, rest];
    match selector >> 4 & 3 {
        0 => drain(&pcap(link, &frames), small()),
        1 => drain(&pcapng(link, &frames, rest), small()),
        2 => drain(&gzip(rest), small()),
        _ => drain(&gzip(&pcap(link, &frames)), small()),
    }
});
