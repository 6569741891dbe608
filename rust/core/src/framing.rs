//! Stream framing (wire version 3): a 4-byte big-endian length prefix and the frame's bytes.
//!
//! After the handshake ([`crate::handshake`]) the connecting side sends frames:
//!
//! ```text
//! frame:      L (4 bytes, big-endian) | payload
//! L == 0:     a keepalive: no payload, not a packet (keeps an idle connection from being closed as idle)
//! bit 31 = 0: a packet frame: N = L (1..=max_frame_size) bytes, one IP packet
//! bit 31 = 1: an offload frame: N = L & 0x7fff_ffff (11..=10 + 65535) bytes, a 10-byte virtio_net_hdr
//!             then one IP packet: a TCP/UDP super-packet (GSO) or a packet whose checksum is still to be
//!             completed, exactly as a Linux TUN with IFF_VNET_HDR reads it (see [`crate::gso`])
//! ```
//!
//! Why offload frames exist: a sending node whose TUN hands it 64 KB TCP super-packets forwards them whole
//! (one frame, one write) instead of 45 packets; the receiving node writes them whole to a TUN that takes
//! them, or segments them in software. Why keepalives: connections to configured peers are made at start and
//! kept, and a receiver closes an authenticated connection that is silent for its idle timeout.
//!
//! A length above the maximum (or an offload frame too short for its header) is a protocol error
//! ([`FramingError`]): the stream cannot be resynchronised and must be closed. [`FrameDecoder`] splits a byte
//! stream into frames across any read boundaries; it holds at most one partial frame (at most
//! `4 + max(max_frame_size, 10 + 65535)` bytes), which is its whole memory bound. Complete frames inside a
//! chunk are handed out as slices of that chunk, without copying.

use std::fmt;

/// Bytes of the length prefix of a frame.
pub const LENGTH_PREFIX_LEN: usize = 4;
/// Default largest frame payload (the largest IPv4 packet / IPv6 packet without jumbogram).
pub const DEFAULT_MAX_FRAME_SIZE: usize = 65_535;
/// Bit 31 of a length prefix: an offload frame (virtio_net_hdr + packet).
pub const OFFLOAD_FLAG: u32 = 1 << 31;
/// Bytes of the `virtio_net_hdr` an offload frame starts with.
pub const VNET_HDR_LEN: usize = 10;
/// The largest offload frame payload: the header and the largest IP packet, whatever `max_frame_size` is.
pub const MAX_OFFLOAD_FRAME: usize = VNET_HDR_LEN + 65_535;
/// The 4 bytes of a keepalive frame.
pub const KEEPALIVE: [u8; LENGTH_PREFIX_LEN] = [0; LENGTH_PREFIX_LEN];
/// The largest `max_frame_size` a decoder accepts (16 MiB), so that its memory bound stays a bound.
pub const MAX_FRAME_SIZE_LIMIT: usize = 1 << 24;

/// A frame that cannot be encoded or decoded. Decoding errors end the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingError {
    /// An empty packet to encode (a length prefix of 0 is a keepalive, not an error).
    ZeroLength,
    /// An offload frame shorter than its virtio_net_hdr plus one byte.
    ShortOffload { len: u64 },
    /// A length prefix (or a packet to encode) above the maximum frame size.
    TooLarge { len: u64, max: usize },
}

impl FramingError {
    /// A short stable name, for counting: `zero_length`, `too_large`.
    pub fn reason(&self) -> &'static str {
        match self {
            FramingError::ZeroLength => "zero_length",
            FramingError::ShortOffload { .. } => "short_offload",
            FramingError::TooLarge { .. } => "too_large",
        }
    }

    /// The offending length.
    pub fn length(&self) -> u64 {
        match self {
            FramingError::ZeroLength => 0,
            FramingError::ShortOffload { len } => *len,
            FramingError::TooLarge { len, .. } => *len,
        }
    }
}

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FramingError::ZeroLength => write!(f, "an empty packet: frames carry at least one byte"),
            FramingError::ShortOffload { len } => {
                write!(
                    f,
                    "offload frame length {len} is shorter than its 10-byte header and a packet"
                )
            }
            FramingError::TooLarge { len, max } => {
                write!(f, "frame length {len} is above the maximum frame size {max}")
            }
        }
    }
}

impl std::error::Error for FramingError {}

#[inline]
fn check_len(len: u64, max: usize) -> Result<usize, FramingError> {
    if len == 0 {
        Err(FramingError::ZeroLength)
    } else if len > max as u64 {
        Err(FramingError::TooLarge { len, max })
    } else {
        Ok(len as usize)
    }
}

/// Appends the frames of `packets` to `out` (which is not cleared, so a buffer can be reused).
///
/// Every packet must be 1..=`max_frame_size` bytes, what a decoder with the same maximum accepts; on error
/// `out` is left as it was.
pub fn encode_frames_into<'a, I>(
    packets: I,
    max_frame_size: usize,
    out: &mut Vec<u8>,
) -> Result<(), FramingError>
where
    I: IntoIterator<Item = &'a [u8]>,
{
    let start = out.len();
    for packet in packets {
        let len = match check_len(packet.len() as u64, max_frame_size.min(u32::MAX as usize)) {
            Ok(len) => len,
            Err(err) => {
                out.truncate(start);
                return Err(err);
            }
        };
        out.reserve(LENGTH_PREFIX_LEN + len);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(packet);
    }
    Ok(())
}

/// The frames of `packets` in one new buffer (see [`encode_frames_into`]).
pub fn encode_frames<'a, I>(packets: I, max_frame_size: usize) -> Result<Vec<u8>, FramingError>
where
    I: IntoIterator<Item = &'a [u8]>,
{
    let mut out = Vec::new();
    encode_frames_into(packets, max_frame_size, &mut out)?;
    Ok(out)
}

/// The kind of a decoded frame; its payload is handed out beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// One IP packet.
    Packet,
    /// A 10-byte virtio_net_hdr then one IP packet (see [`crate::gso`]).
    Offload,
}

/// Appends one offload frame (a virtio_net_hdr and `packet`) to `out`; on error `out` is left as it was.
pub fn encode_offload_frame_into(
    header: &[u8; VNET_HDR_LEN],
    packet: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FramingError> {
    let len = VNET_HDR_LEN + packet.len();
    if packet.is_empty() {
        return Err(FramingError::ShortOffload { len: len as u64 });
    }
    if len > MAX_OFFLOAD_FRAME {
        return Err(FramingError::TooLarge {
            len: len as u64,
            max: MAX_OFFLOAD_FRAME,
        });
    }
    out.reserve(LENGTH_PREFIX_LEN + len);
    out.extend_from_slice(&(len as u32 | OFFLOAD_FLAG).to_be_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(packet);
    Ok(())
}

/// What a length prefix announces.
#[derive(Clone, Copy)]
enum Prefix {
    Keepalive,
    Frame(FrameKind, usize),
}

/// Splits a byte stream into frames, across any read boundaries.
///
/// Feed it the bytes as they arrive; it calls back with each complete frame (kind and payload), in order;
/// keepalives are counted (`keepalives`) and not handed out. Between calls it keeps only the unfinished frame
/// (at most `4 + max(max_frame_size, 10 + 65535)` bytes). A length prefix above the maximum is reported as
/// soon as its 4 bytes are known, before any of its payload is buffered; the decoder is then failed for good
/// and every later `feed` returns the same error.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_frame_size: usize,
    partial: Vec<u8>,
    failed: Option<FramingError>,
    frames: u64,
    bytes: u64,
    keepalives: u64,
    offload_frames: u64,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(DEFAULT_MAX_FRAME_SIZE)
    }
}

impl FrameDecoder {
    /// A decoder refusing packet frames above `max_frame_size` (clamped to 1..=16 MiB).
    pub fn new(max_frame_size: usize) -> Self {
        FrameDecoder {
            max_frame_size: max_frame_size.clamp(1, MAX_FRAME_SIZE_LIMIT),
            partial: Vec::new(),
            failed: None,
            frames: 0,
            bytes: 0,
            keepalives: 0,
            offload_frames: 0,
        }
    }

    /// The largest packet frame this decoder accepts.
    pub fn max_frame_size(&self) -> usize {
        self.max_frame_size
    }

    /// Bytes held of an unfinished frame.
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    /// The error that failed this decoder, if any.
    pub fn error(&self) -> Option<FramingError> {
        self.failed
    }

    /// Frames decoded so far (packet and offload frames; keepalives are not frames).
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Payload bytes of the frames decoded so far (offload frames count their header).
    pub fn payload_bytes(&self) -> u64 {
        self.bytes
    }

    /// Keepalives received so far.
    pub fn keepalives(&self) -> u64 {
        self.keepalives
    }

    /// Offload frames among `frames`.
    pub fn offload_frames(&self) -> u64 {
        self.offload_frames
    }

    /// True when no frame is half-received and the decoder has not failed.
    pub fn is_at_boundary(&self) -> bool {
        self.partial.is_empty() && self.failed.is_none()
    }

    #[inline]
    fn fail(&mut self, err: FramingError) -> Result<(), FramingError> {
        self.failed = Some(err);
        self.partial = Vec::new();
        Err(err)
    }

    #[inline]
    fn prefix(&self, prefix: &[u8]) -> Result<Prefix, FramingError> {
        let raw = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        if raw == 0 {
            return Ok(Prefix::Keepalive);
        }
        if raw & OFFLOAD_FLAG == 0 {
            return Ok(Prefix::Frame(
                FrameKind::Packet,
                check_len(u64::from(raw), self.max_frame_size)?,
            ));
        }
        let len = (raw & !OFFLOAD_FLAG) as usize;
        if len <= VNET_HDR_LEN {
            return Err(FramingError::ShortOffload { len: len as u64 });
        }
        Ok(Prefix::Frame(
            FrameKind::Offload,
            check_len(len as u64, MAX_OFFLOAD_FRAME)?,
        ))
    }

    #[inline]
    fn count(&mut self, kind: FrameKind, len: usize) {
        self.frames += 1;
        self.bytes += len as u64;
        if kind == FrameKind::Offload {
            self.offload_frames += 1;
        }
    }

    /// Decodes `data`, calling `on_frame(kind, payload)` for every frame it completes. Frames already
    /// handed out stay handed out when an error follows them in the same chunk.
    pub fn feed_frames(
        &mut self,
        mut data: &[u8],
        mut on_frame: impl FnMut(FrameKind, &[u8]),
    ) -> Result<(), FramingError> {
        if let Some(err) = self.failed {
            return Err(err);
        }
        if !self.partial.is_empty() {
            if self.partial.len() < LENGTH_PREFIX_LEN {
                let take = (LENGTH_PREFIX_LEN - self.partial.len()).min(data.len());
                self.partial.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.partial.len() < LENGTH_PREFIX_LEN {
                    return Ok(());
                }
            }
            match self.prefix(&self.partial[..LENGTH_PREFIX_LEN]) {
                Err(err) => return self.fail(err),
                Ok(Prefix::Keepalive) => {
                    self.keepalives += 1;
                    self.partial.clear();
                }
                Ok(Prefix::Frame(kind, len)) => {
                    let total = LENGTH_PREFIX_LEN + len;
                    let take = (total - self.partial.len()).min(data.len());
                    self.partial.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.partial.len() < total {
                        return Ok(());
                    }
                    on_frame(kind, &self.partial[LENGTH_PREFIX_LEN..]);
                    self.count(kind, len);
                    self.partial.clear();
                }
            }
        }
        loop {
            if data.len() < LENGTH_PREFIX_LEN {
                self.partial.extend_from_slice(data);
                return Ok(());
            }
            match self.prefix(&data[..LENGTH_PREFIX_LEN]) {
                Err(err) => return self.fail(err),
                Ok(Prefix::Keepalive) => {
                    self.keepalives += 1;
                    data = &data[LENGTH_PREFIX_LEN..];
                }
                Ok(Prefix::Frame(kind, len)) => {
                    let total = LENGTH_PREFIX_LEN + len;
                    if data.len() < total {
                        self.partial.extend_from_slice(data);
                        return Ok(());
                    }
                    on_frame(kind, &data[LENGTH_PREFIX_LEN..total]);
                    self.count(kind, len);
                    data = &data[total..];
                }
            }
        }
    }

    /// Like [`FrameDecoder::feed_frames`], for a peer that only sends packet frames: the payload of every
    /// frame (an offload frame's includes its header; check `offload_frames` or use `feed_frames`).
    pub fn feed(&mut self, data: &[u8], mut on_frame: impl FnMut(&[u8])) -> Result<(), FramingError> {
        self.feed_frames(data, |_, payload| on_frame(payload))
    }

    /// Decodes `data` and appends every completed frame payload to `data_out`, its length to `lengths_out`.
    pub fn feed_into(
        &mut self,
        data: &[u8],
        data_out: &mut Vec<u8>,
        lengths_out: &mut Vec<usize>,
    ) -> Result<(), FramingError> {
        self.feed(data, |frame| {
            data_out.extend_from_slice(frame);
            lengths_out.push(frame.len());
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(decoder: &mut FrameDecoder, chunks: &[&[u8]]) -> Result<Vec<Vec<u8>>, FramingError> {
        let mut out = Vec::new();
        for chunk in chunks {
            decoder.feed(chunk, |f| out.push(f.to_vec()))?;
        }
        Ok(out)
    }

    #[test]
    fn round_trip_one_chunk() {
        let packets: Vec<&[u8]> = vec![b"a", b"hello", &[0u8; 1400]];
        let wire = encode_frames(packets.iter().copied(), DEFAULT_MAX_FRAME_SIZE).unwrap();
        assert_eq!(wire.len(), 3 * 4 + 1 + 5 + 1400);
        assert_eq!(&wire[..5], &[0, 0, 0, 1, b'a']);
        let mut d = FrameDecoder::default();
        let got = decode_all(&mut d, &[&wire]).unwrap();
        assert_eq!(got, packets.iter().map(|p| p.to_vec()).collect::<Vec<_>>());
        assert!(d.is_at_boundary());
        assert_eq!(d.frames(), 3);
        assert_eq!(d.payload_bytes(), 1406);
    }

    #[test]
    fn byte_by_byte() {
        let packets: Vec<Vec<u8>> = (1..50u8).map(|n| vec![n; n as usize]).collect();
        let wire = encode_frames(packets.iter().map(|p| p.as_slice()), 100).unwrap();
        let mut d = FrameDecoder::new(100);
        let chunks: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(decode_all(&mut d, &chunks).unwrap(), packets);
    }

    #[test]
    fn zero_length_is_a_keepalive() {
        let mut d = FrameDecoder::default();
        let mut wire = KEEPALIVE.to_vec();
        wire.extend_from_slice(&encode_frames([&b"ok"[..]], 10).unwrap());
        wire.extend_from_slice(&KEEPALIVE[..2]);
        let mut got = Vec::new();
        d.feed(&wire, |f| got.push(f.to_vec())).unwrap();
        d.feed(&KEEPALIVE[2..], |f| got.push(f.to_vec())).unwrap();
        assert_eq!(got, vec![b"ok".to_vec()]);
        assert_eq!((d.frames(), d.keepalives()), (1, 2));
        assert!(d.is_at_boundary());
    }

    #[test]
    fn offload_frames_round_trip_and_bounds() {
        let mut payload = vec![0u8; VNET_HDR_LEN];
        payload.extend_from_slice(&[7u8; 3000]);
        let mut wire = Vec::new();
        encode_offload_frame_into(&[0; VNET_HDR_LEN], &[7u8; 3000], &mut wire).unwrap();
        wire.extend_from_slice(&encode_frames([&b"p"[..]], 10).unwrap());
        // max_frame_size (10) bounds packet frames only: the offload frame is 3010 bytes.
        let mut d = FrameDecoder::new(10);
        let mut got = Vec::new();
        for chunk in wire.chunks(7) {
            d.feed_frames(chunk, |k, f| got.push((k, f.to_vec()))).unwrap();
        }
        assert_eq!(
            got,
            vec![
                (FrameKind::Offload, payload.clone()),
                (FrameKind::Packet, b"p".to_vec())
            ]
        );
        assert_eq!((d.frames(), d.offload_frames()), (2, 1));
        assert_eq!(
            encode_offload_frame_into(&[0; VNET_HDR_LEN], &[], &mut Vec::new()),
            Err(FramingError::ShortOffload { len: 10 })
        );
        let mut d = FrameDecoder::default();
        let short = (OFFLOAD_FLAG | 10).to_be_bytes();
        assert_eq!(
            d.feed(&short, |_| ()),
            Err(FramingError::ShortOffload { len: 10 })
        );
        let mut d = FrameDecoder::default();
        let huge = (OFFLOAD_FLAG | (MAX_OFFLOAD_FRAME as u32 + 1)).to_be_bytes();
        assert_eq!(d.feed(&huge, |_| ()).unwrap_err().reason(), "too_large");
    }

    #[test]
    fn huge_length_is_refused_before_buffering() {
        let mut d = FrameDecoder::default();
        // 0x7FFFFFFF: about 2 GB announced; split prefix so the check happens on the partial path too.
        assert_eq!(d.feed(&[0x7F, 0xFF], |_| ()), Ok(()));
        assert_eq!(d.buffered(), 2);
        let err = d.feed(&[0xFF, 0xFF, 1, 2, 3], |_| ()).unwrap_err();
        assert_eq!(
            err,
            FramingError::TooLarge {
                len: 0x7FFF_FFFF,
                max: DEFAULT_MAX_FRAME_SIZE
            }
        );
        assert_eq!(err.reason(), "too_large");
        assert_eq!(d.buffered(), 0);
        let mut d = FrameDecoder::new(10);
        assert!(matches!(
            d.feed(&[0, 0, 0, 11], |_| ()),
            Err(FramingError::TooLarge { len: 11, max: 10 })
        ));
    }

    #[test]
    fn max_size_frame_is_accepted() {
        let mut d = FrameDecoder::new(10);
        let wire = encode_frames([&[7u8; 10][..]], 10).unwrap();
        assert_eq!(
            decode_all(&mut d, &[&wire[..7], &wire[7..]]).unwrap(),
            vec![vec![7u8; 10]]
        );
    }

    #[test]
    fn encode_rejects_what_decode_would() {
        let mut out = b"keep".to_vec();
        assert_eq!(
            encode_frames_into([&b"x"[..], &b""[..]], 10, &mut out),
            Err(FramingError::ZeroLength)
        );
        assert_eq!(out, b"keep");
        assert!(matches!(
            encode_frames([&[0u8; 11][..]], 10),
            Err(FramingError::TooLarge { len: 11, max: 10 })
        ));
    }

    #[test]
    fn feed_into_collects() {
        let wire = encode_frames([&b"ab"[..], &b"cde"[..]], 10).unwrap();
        let mut d = FrameDecoder::new(10);
        let (mut data, mut lens) = (Vec::new(), Vec::new());
        d.feed_into(&wire[..3], &mut data, &mut lens).unwrap();
        assert!(lens.is_empty());
        d.feed_into(&wire[3..], &mut data, &mut lens).unwrap();
        assert_eq!(
            (data.as_slice(), lens.as_slice()),
            (&b"abcde"[..], &[2usize, 3][..])
        );
    }

    proptest! {
        #[test]
        fn every_chunking_decodes_the_same(
            packets in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 0..40),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..30),
        ) {
            let wire = encode_frames(packets.iter().map(|p| p.as_slice()), 300).unwrap();
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
            points.push(0);
            points.push(wire.len());
            points.sort_unstable();
            let chunks: Vec<&[u8]> = points.windows(2).map(|w| &wire[w[0]..w[1]]).collect();
            let mut d = FrameDecoder::new(300);
            let got = decode_all(&mut d, &chunks).unwrap();
            prop_assert_eq!(got, packets);
            prop_assert!(d.is_at_boundary());
        }

        #[test]
        fn random_bytes_never_panic_and_stay_bounded(
            data in prop::collection::vec(any::<u8>(), 0..2000),
            max in 1usize..500,
            step in 1usize..64,
        ) {
            // Packet frames are bounded by `max`, offload frames (the prefix's high bit) by
            // MAX_OFFLOAD_FRAME whatever `max` is: random bytes make both kinds.
            let mut d = FrameDecoder::new(max);
            for chunk in data.chunks(step) {
                let mut frames_ok = true;
                let res = d.feed_frames(chunk, |kind, f| {
                    let bound = match kind {
                        FrameKind::Packet => max,
                        FrameKind::Offload => MAX_OFFLOAD_FRAME,
                    };
                    frames_ok &= !f.is_empty() && f.len() <= bound;
                });
                prop_assert!(frames_ok);
                prop_assert!(d.buffered() <= max.max(MAX_OFFLOAD_FRAME) + LENGTH_PREFIX_LEN);
                if res.is_err() {
                    prop_assert_eq!(d.buffered(), 0);
                }
            }
        }
    }
}
