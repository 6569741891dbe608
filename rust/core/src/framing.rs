//! Stream framing: a 4-byte big-endian length and the packet.
//!
//! After the handshake ([`crate::handshake`]) the connecting side sends frames:
//!
//! ```text
//! frame:  N (4 bytes, big-endian, 1..=max_frame_size) | N bytes (one IP packet)
//! ```
//!
//! A length of 0 or above the configured maximum is a protocol error ([`FramingError`]): the stream cannot
//! be resynchronised and must be closed. [`FrameDecoder`] splits a byte stream into frames across any read
//! boundaries; it holds at most one partial frame (at most `4 + max_frame_size` bytes), which is its whole
//! memory bound. Complete frames inside a chunk are handed out as slices of that chunk, without copying.

use std::fmt;

/// Bytes of the length prefix of a frame.
pub const LENGTH_PREFIX_LEN: usize = 4;
/// Default largest frame payload (the largest IPv4 packet / IPv6 packet without jumbogram).
pub const DEFAULT_MAX_FRAME_SIZE: usize = 65_535;
/// The largest `max_frame_size` a decoder accepts (16 MiB), so that its memory bound stays a bound.
pub const MAX_FRAME_SIZE_LIMIT: usize = 1 << 24;

/// A frame that cannot be encoded or decoded. Decoding errors end the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingError {
    /// A length prefix of 0 (or an empty packet to encode).
    ZeroLength,
    /// A length prefix (or a packet to encode) above the maximum frame size.
    TooLarge { len: u64, max: usize },
}

impl FramingError {
    /// A short stable name, for counting: `zero_length`, `too_large`.
    pub fn reason(&self) -> &'static str {
        match self {
            FramingError::ZeroLength => "zero_length",
            FramingError::TooLarge { .. } => "too_large",
        }
    }

    /// The offending length.
    pub fn length(&self) -> u64 {
        match self {
            FramingError::ZeroLength => 0,
            FramingError::TooLarge { len, .. } => *len,
        }
    }
}

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FramingError::ZeroLength => write!(f, "frame length 0: frames carry at least one byte"),
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

/// Splits a byte stream into frames, across any read boundaries.
///
/// Feed it the bytes as they arrive; it calls back with each complete frame payload, in order. Between calls
/// it keeps only the unfinished frame (at most `4 + max_frame_size` bytes). A length prefix of 0 or above the
/// maximum is reported as soon as its 4 bytes are known, before any of its payload is buffered; the decoder
/// is then failed for good and every later `feed` returns the same error.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_frame_size: usize,
    /// The unfinished frame: its length prefix (possibly partial), then part of its payload.
    partial: Vec<u8>,
    failed: Option<FramingError>,
    frames: u64,
    bytes: u64,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(DEFAULT_MAX_FRAME_SIZE)
    }
}

impl FrameDecoder {
    /// A decoder accepting frames of 1..=`max_frame_size` bytes (clamped to 1..=[`MAX_FRAME_SIZE_LIMIT`]).
    pub fn new(max_frame_size: usize) -> Self {
        FrameDecoder {
            max_frame_size: max_frame_size.clamp(1, MAX_FRAME_SIZE_LIMIT),
            partial: Vec::new(),
            failed: None,
            frames: 0,
            bytes: 0,
        }
    }

    pub fn max_frame_size(&self) -> usize {
        self.max_frame_size
    }

    /// Bytes held of the unfinished frame (prefix included).
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    /// The error that failed the decoder, if any.
    pub fn error(&self) -> Option<FramingError> {
        self.failed
    }

    /// Complete frames decoded so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Payload bytes of the complete frames decoded so far.
    pub fn payload_bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether the stream may end here: no unfinished frame and no error.
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
    fn payload_len(&self, prefix: &[u8]) -> Result<usize, FramingError> {
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        check_len(u64::from(len), self.max_frame_size)
    }

    /// Decodes what `data` completes, calling `on_frame` with each whole frame payload in stream order.
    ///
    /// Frames before a bad length prefix are handed out before the error is returned.
    pub fn feed(&mut self, mut data: &[u8], mut on_frame: impl FnMut(&[u8])) -> Result<(), FramingError> {
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
            let len = match self.payload_len(&self.partial[..LENGTH_PREFIX_LEN]) {
                Ok(len) => len,
                Err(err) => return self.fail(err),
            };
            let total = LENGTH_PREFIX_LEN + len;
            let take = (total - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() < total {
                return Ok(());
            }
            on_frame(&self.partial[LENGTH_PREFIX_LEN..]);
            self.frames += 1;
            self.bytes += len as u64;
            self.partial.clear();
        }
        loop {
            if data.len() < LENGTH_PREFIX_LEN {
                self.partial.extend_from_slice(data);
                return Ok(());
            }
            let len = match self.payload_len(&data[..LENGTH_PREFIX_LEN]) {
                Ok(len) => len,
                Err(err) => return self.fail(err),
            };
            let total = LENGTH_PREFIX_LEN + len;
            if data.len() < total {
                self.partial.extend_from_slice(data);
                return Ok(());
            }
            on_frame(&data[LENGTH_PREFIX_LEN..total]);
            self.frames += 1;
            self.bytes += len as u64;
            data = &data[total..];
        }
    }

    /// Like [`FrameDecoder::feed`], collecting the payloads end to end in `data_out` and their lengths in
    /// `lengths_out` (both appended to, so they can be reused).
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
    fn zero_length_is_an_error_and_sticks() {
        let mut d = FrameDecoder::default();
        let mut wire = encode_frames([&b"ok"[..]], 10).unwrap();
        wire.extend_from_slice(&[0, 0, 0, 0, 9, 9]);
        let mut got = Vec::new();
        assert_eq!(
            d.feed(&wire, |f| got.push(f.to_vec())),
            Err(FramingError::ZeroLength)
        );
        assert_eq!(got, vec![b"ok".to_vec()]);
        assert_eq!(d.feed(b"", |_| ()), Err(FramingError::ZeroLength));
        assert_eq!(d.buffered(), 0);
        assert!(!d.is_at_boundary());
    }

    #[test]
    fn huge_length_is_refused_before_buffering() {
        let mut d = FrameDecoder::default();
        // 0xFFFFFFFF: about 4 GB announced; split prefix so the check happens on the partial path too.
        assert_eq!(d.feed(&[0xFF, 0xFF], |_| ()), Ok(()));
        assert_eq!(d.buffered(), 2);
        let err = d.feed(&[0xFF, 0xFF, 1, 2, 3], |_| ()).unwrap_err();
        assert_eq!(
            err,
            FramingError::TooLarge {
                len: u32::MAX as u64,
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
            let mut d = FrameDecoder::new(max);
            for chunk in data.chunks(step) {
                let mut frames_ok = true;
                let res = d.feed(chunk, |f| frames_ok &= !f.is_empty() && f.len() <= max);
                prop_assert!(frames_ok);
                prop_assert!(d.buffered() <= max + LENGTH_PREFIX_LEN);
                if res.is_err() {
                    prop_assert_eq!(d.buffered(), 0);
                }
            }
        }
    }
}
