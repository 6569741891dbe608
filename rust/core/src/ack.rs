//! Acknowledgements: how the receiving side tells the sender how many frames of a connection it has taken.
//!
//! After an accepting answer ([`crate::handshake`]) the server sends nothing but ack records:
//!
//! ```text
//! ack:  'K' | taken (8 bytes, big-endian)
//! ```
//!
//! `taken` counts the frames of this connection that the receiver has processed since the handshake:
//! delivered to its sink, or dropped and counted (a spoofed source, say). It never decreases. The sender
//! counts a packet as sent only once an ack covers it, so "sent" means "the peer has it". One record per
//! read chunk (not per packet) keeps the cost at 9 bytes per up to 256 KiB of frames.

use std::fmt;

/// Bytes of one ack record.
pub const ACK_LEN: usize = 9;
const KIND_ACK: u8 = b'K';

/// The ack record for `taken` frames.
pub fn encode_ack(taken: u64) -> [u8; ACK_LEN] {
    let mut out = [0u8; ACK_LEN];
    out[0] = KIND_ACK;
    out[1..].copy_from_slice(&taken.to_be_bytes());
    out
}

/// Bytes from a receiver that are not a valid ack stream. The connection cannot be trusted after one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckError {
    /// A record that does not start with `'K'`.
    UnexpectedKind(u8),
    /// A count below one already acknowledged: the receiver contradicts itself.
    Regressed { from: u64, to: u64 },
}

impl AckError {
    /// A short stable name, for counting: `unexpected_message`, `ack_regressed`.
    pub fn reason(&self) -> &'static str {
        match self {
            AckError::UnexpectedKind(_) => "unexpected_message",
            AckError::Regressed { .. } => "ack_regressed",
        }
    }
}

impl fmt::Display for AckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AckError::UnexpectedKind(kind) => write!(f, "expected an ack record, got kind byte {kind}"),
            AckError::Regressed { from, to } => {
                write!(f, "the peer acknowledged {to} frames after acknowledging {from}")
            }
        }
    }
}

impl std::error::Error for AckError {}

/// Reads ack records across any read boundaries; holds at most one partial record (8 bytes).
#[derive(Debug, Default, Clone)]
pub struct AckDecoder {
    partial: [u8; ACK_LEN],
    have: usize,
    taken: u64,
    failed: Option<AckError>,
}

impl AckDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The highest count acknowledged so far.
    pub fn taken(&self) -> u64 {
        self.taken
    }

    /// Bytes of a partial record held.
    pub fn buffered(&self) -> usize {
        self.have
    }

    /// Feeds received bytes; returns the highest count acknowledged so far. After an error every call
    /// returns it again: the stream cannot be resynchronised.
    pub fn feed(&mut self, data: &[u8]) -> Result<u64, AckError> {
        if let Some(err) = self.failed {
            return Err(err);
        }
        for &byte in data {
            if self.have == 0 && byte != KIND_ACK {
                return Err(*self.failed.insert(AckError::UnexpectedKind(byte)));
            }
            self.partial[self.have] = byte;
            self.have += 1;
            if self.have == ACK_LEN {
                self.have = 0;
                let mut count = [0u8; 8];
                count.copy_from_slice(&self.partial[1..]);
                let taken = u64::from_be_bytes(count);
                if taken < self.taken {
                    let err = AckError::Regressed {
                        from: self.taken,
                        to: taken,
                    };
                    return Err(*self.failed.insert(err));
                }
                self.taken = taken;
            }
        }
        Ok(self.taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn records_across_boundaries() {
        let mut wire = Vec::new();
        for n in [0u64, 5, 5, 1 << 40] {
            wire.extend_from_slice(&encode_ack(n));
        }
        let mut d = AckDecoder::new();
        let mut last = 0;
        for chunk in wire.chunks(4) {
            last = d.feed(chunk).unwrap();
        }
        assert_eq!(last, 1 << 40);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn errors_stick() {
        let mut d = AckDecoder::new();
        d.feed(&encode_ack(10)).unwrap();
        assert_eq!(
            d.feed(&encode_ack(9)),
            Err(AckError::Regressed { from: 10, to: 9 })
        );
        assert_eq!(d.feed(&encode_ack(11)).unwrap_err().reason(), "ack_regressed");
        let mut d = AckDecoder::new();
        assert_eq!(d.feed(b"VPNP").unwrap_err(), AckError::UnexpectedKind(b'V'));
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_last_count(counts in proptest::collection::vec(0u64..1_000_000, 0..20), cut in 1usize..20) {
            let mut sorted = counts.clone();
            sorted.sort_unstable();
            let wire: Vec<u8> = sorted.iter().flat_map(|&n| encode_ack(n)).collect();
            let mut d = AckDecoder::new();
            for chunk in wire.chunks(cut) {
                d.feed(chunk).unwrap();
            }
            prop_assert_eq!(d.taken(), sorted.last().copied().unwrap_or(0));
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut d = AckDecoder::new();
            let _ = d.feed(&data);
            prop_assert!(d.buffered() < ACK_LEN);
        }
    }
}
