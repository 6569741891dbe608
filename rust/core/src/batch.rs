//! Grouping a batch of packets by destination, keeping order within each destination.

use std::collections::HashMap;

use foldhash::fast::RandomState;

use crate::parse::{destination, Destination, PacketSummary, ParseError};

/// Packets of one destination, in the order they appeared in the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub destination: Destination,
    /// Indices into the batch, ascending.
    pub members: Vec<usize>,
}

/// A batch split by destination: groups in order of first appearance, and the packets that failed to parse.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grouped {
    pub groups: Vec<Group>,
    pub rejected: Vec<(usize, ParseError)>,
}

/// Groups packets by destination key. One hash lookup per packet on the compact (address, port) pair;
/// key text is made once per group by the caller. The hasher is foldhash with a per-process random seed:
/// fast on 20-byte keys, and a batch is bounded, so crafted collisions cannot cost more than one batch.
pub fn group_by_destination<'a, I>(packets: I) -> Grouped
where
    I: IntoIterator<Item = &'a [u8]>,
{
    let mut index: HashMap<Destination, usize, RandomState> = HashMap::default();
    let mut grouped = Grouped::default();
    for (i, packet) in packets.into_iter().enumerate() {
        match destination(packet) {
            Ok(dest) => {
                let slot = *index.entry(dest).or_insert_with(|| {
                    grouped.groups.push(Group {
                        destination: dest,
                        members: Vec::new(),
                    });
                    grouped.groups.len() - 1
                });
                grouped.groups[slot].members.push(i);
            }
            Err(err) => grouped.rejected.push((i, err)),
        }
    }
    grouped
}

/// Traffic to one destination: packets, bytes, and packets per protocol (in order of first appearance).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub packets: usize,
    pub bytes: usize,
    pub protocols: Vec<(u8, usize)>,
}

/// Tallies parsed packets `(summary, size)` per destination, in order of first appearance.
pub fn tally_by_destination<I>(packets: I) -> Vec<(Destination, Tally)>
where
    I: IntoIterator<Item = (PacketSummary, usize)>,
{
    let mut index: HashMap<Destination, usize, RandomState> = HashMap::default();
    let mut tallies: Vec<(Destination, Tally)> = Vec::new();
    for (summary, size) in packets {
        let dest = summary.destination();
        let slot = *index.entry(dest).or_insert_with(|| {
            tallies.push((dest, Tally::default()));
            tallies.len() - 1
        });
        let tally = &mut tallies[slot].1;
        tally.packets += 1;
        tally.bytes += size;
        match tally.protocols.iter_mut().find(|(p, _)| *p == summary.protocol) {
            Some((_, n)) => *n += 1,
            None => tally.protocols.push((summary.protocol, 1)),
        }
    }
    tallies
}

/// Splits a contiguous buffer into packets of the given lengths (the shape a batched read produces).
/// Fails when the lengths add up to more than the buffer holds.
pub fn split_by_lengths<'a>(buffer: &'a [u8], lengths: &[usize]) -> Result<Vec<&'a [u8]>, SplitError> {
    let mut out = Vec::with_capacity(lengths.len());
    let mut offset = 0usize;
    for &len in lengths {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= buffer.len())
            .ok_or_else(|| SplitError {
                needed: lengths.iter().fold(0usize, |a, &l| a.saturating_add(l)),
                available: buffer.len(),
            })?;
        out.push(&buffer[offset..end]);
        offset = end;
    }
    Ok(out)
}

/// The lengths of a split ask for more bytes than the buffer has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitError {
    pub needed: usize,
    pub available: usize,
}

impl core::fmt::Display for SplitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "packet lengths add up to {} bytes but the buffer holds {}",
            self.needed, self.available
        )
    }
}

impl std::error::Error for SplitError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp4(dst_last: u8, dport: u16) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, dst_last,
        ];
        p.extend_from_slice(&[0, 1]);
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0, 8, 0, 0]);
        p
    }

    #[test]
    fn groups_keep_first_seen_order_and_member_order() {
        let packets = [udp4(2, 80), udp4(3, 80), vec![0x45], udp4(2, 80), udp4(2, 81)];
        let g = group_by_destination(packets.iter().map(Vec::as_slice));
        let keys: Vec<String> = g.groups.iter().map(|g| g.destination.key()).collect();
        assert_eq!(keys, ["10.0.0.2:80", "10.0.0.3:80", "10.0.0.2:81"]);
        assert_eq!(g.groups[0].members, [0, 3]);
        assert_eq!(
            g.rejected,
            [(
                2,
                ParseError::Truncated {
                    version: 4,
                    len: 1,
                    required: 20
                }
            )]
        );
    }

    #[test]
    fn tally_counts_packets_bytes_and_protocols() {
        let packets = [udp4(2, 80), udp4(3, 80), udp4(2, 80)];
        let tallies = tally_by_destination(
            packets
                .iter()
                .map(|p| (crate::parse::extract(p).unwrap(), p.len() + 1)),
        );
        assert_eq!(tallies.len(), 2);
        assert_eq!(tallies[0].0.key(), "10.0.0.2:80");
        assert_eq!(
            tallies[0].1,
            Tally {
                packets: 2,
                bytes: 58,
                protocols: vec![(17, 2)]
            }
        );
    }

    #[test]
    fn split() {
        let buf = [1u8, 2, 3, 4, 5];
        assert_eq!(
            split_by_lengths(&buf, &[2, 0, 3]).unwrap(),
            [&buf[..2], &buf[2..2], &buf[2..]]
        );
        assert_eq!(
            split_by_lengths(&buf, &[4, 2]),
            Err(SplitError {
                needed: 6,
                available: 5
            })
        );
        assert!(split_by_lengths(&buf, &[usize::MAX, 2]).is_err());
    }
}
