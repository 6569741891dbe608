//! Per-destination bounded queues of packets, held already framed for the wire.
//!
//! The dispatcher's hot path: a batch of packets (a TUN read's buffer and lengths, or a list) is parsed and
//! each packet is appended to the queue of its destination key, as a frame (see [`crate::framing`]), in one
//! contiguous buffer per queue. A worker's drain then takes that buffer whole (swapped for an empty one, no
//! copy) and writes it as it is. Nothing here allocates per packet beyond the growth of those buffers.
//!
//! Who decides what: the queues bound each destination (`capacity` packets, minus the packets its worker is
//! writing, see [`DestinationQueues::set_in_flight`]) and count the rejections they decide (`invalid_packet`,
//! `queue_full`). Whether a new destination gets a queue at all (a worker, within the worker limit) is the
//! caller's decision, made once per key and never per packet: a batch push queues the packets of a key it
//! has never seen in a *provisional* queue and reports it ([`Pushed::new`]); the caller then either adopts
//! it ([`DestinationQueues::add`]) or removes it ([`DestinationQueues::remove`], which returns how many
//! packets it held, to be counted as rejected by the caller's reason).
//!
//! Offloads: a TUN opened with `IFF_VNET_HDR` prefixes every packet with a 10-byte `virtio_net_hdr`. A
//! packet whose header is all zero needs none and is framed plainly; any other is framed as an *offload
//! frame*: the length prefix has [`OFFLOAD_FLAG`] set and the payload is the 10 header bytes, then the
//! packet.
//!
//! ```text
//! plain frame:    N            (4 bytes, big-endian)  | packet (N bytes)
//! offload frame:  (10 + N) | OFFLOAD_FLAG              | virtio_net_hdr (10 bytes) | packet (N bytes)
//! ```

use std::collections::HashMap;

use foldhash::fast::RandomState;

use crate::batch::SplitError;
use crate::framing::{
    encode_frames_into, encode_offload_frame_into, DEFAULT_MAX_FRAME_SIZE, LENGTH_PREFIX_LEN,
};
pub use crate::framing::{OFFLOAD_FLAG, VNET_HDR_LEN};
use crate::gso;
use crate::parse::{destination, Destination};

/// A queue emptied by a take starts its next buffer with room for what the last take held, up to this much:
/// a steady flow then fills its buffer without growing it step by step, and an idle queue holds nothing.
const SIZE_HINT_MAX: usize = 64 * 1024;

/// A queue's index: stable while the queue exists, reused after it is removed. Use keys across calls.
pub type QueueId = usize;

/// Rejections decided by the queues, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rejections {
    /// No trustworthy destination (see [`crate::parse`]), an empty packet, one above the maximum packet
    /// size, or (with `vnet_header`) an entry shorter than its header.
    pub invalid_packet: u64,
    /// The destination's queue was full.
    pub queue_full: u64,
}

/// What a batch push did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pushed {
    /// Packets queued on existing (not provisional) queues.
    pub accepted: usize,
    /// Existing queues that were empty before this push and are not now, in the order they became so.
    pub ready: Vec<QueueId>,
    /// Provisional queues this push created, for keys without a queue, in order of first appearance.
    /// The caller adopts ([`DestinationQueues::add`]) or removes each before anything else.
    pub new: Vec<QueueId>,
    /// A queue reached half its capacity or overflowed: worth draining at once.
    pub pressure: bool,
}

/// What a push of one packet under a caller-given key did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyedPush {
    /// Queued behind other packets.
    Queued,
    /// Queued on an empty queue: the queue became ready.
    Ready,
    /// Queued, and the queue is at least half full.
    Pressure,
    /// Rejected: the queue is full (counted).
    Full,
    /// Not queued: there is no queue for this key (not counted: the caller decides).
    Unknown,
    /// Rejected: an empty packet or one above the maximum packet size (counted).
    Invalid,
}

#[derive(Debug)]
struct Queue {
    key: String,
    /// The parsed destination this queue is indexed under in `by_dest`, if any.
    dest: Option<Destination>,
    framed: Vec<u8>,
    count: usize,
    /// Bytes the last take held (at most `SIZE_HINT_MAX`): the room the next buffer starts with.
    size_hint: usize,
    in_flight: usize,
    /// Packets rejected as `queue_full` on this queue.
    dropped: u64,
    /// Packets that did not fit while the queue was provisional (counted once it is adopted or removed).
    overflow: usize,
    provisional: bool,
}

/// Bounded per-destination queues of framed packets; see the module documentation.
#[derive(Debug)]
pub struct DestinationQueues {
    capacity: usize,
    half: usize,
    max_packet_len: usize,
    slots: Vec<Option<Queue>>,
    free: Vec<QueueId>,
    by_key: HashMap<String, QueueId, RandomState>,
    by_dest: HashMap<Destination, QueueId, RandomState>,
    rejected: Rejections,
    offload_frames: u64,
}

impl DestinationQueues {
    /// Queues of at most `capacity` packets each (at least 1), for packets of 1..=`max_packet_len` bytes
    /// (clamped to 1..=65535, what a frame carries).
    pub fn new(capacity: usize, max_packet_len: usize) -> Self {
        let capacity = capacity.max(1);
        DestinationQueues {
            capacity,
            half: (capacity / 2).max(1),
            max_packet_len: max_packet_len.clamp(1, DEFAULT_MAX_FRAME_SIZE),
            slots: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::default(),
            by_dest: HashMap::default(),
            rejected: Rejections::default(),
            offload_frames: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn max_packet_len(&self) -> usize {
        self.max_packet_len
    }

    /// Rejections counted so far, by reason.
    pub fn rejected(&self) -> Rejections {
        self.rejected
    }

    /// Offload frames queued so far.
    pub fn offload_frames(&self) -> u64 {
        self.offload_frames
    }

    /// Number of queues (provisional ones included).
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The queue of `key`, if there is one.
    #[inline]
    pub fn id(&self, key: &str) -> Option<QueueId> {
        self.by_key.get(key).copied()
    }

    #[inline]
    fn queue(&self, id: QueueId) -> Option<&Queue> {
        self.slots.get(id).and_then(Option::as_ref)
    }

    #[inline]
    fn queue_mut(&mut self, id: QueueId) -> Option<&mut Queue> {
        self.slots.get_mut(id).and_then(Option::as_mut)
    }

    /// The key of queue `id`.
    pub fn key(&self, id: QueueId) -> Option<&str> {
        self.queue(id).map(|q| q.key.as_str())
    }

    /// The parsed destination of queue `id` (known for queues a batch push created or routed to).
    pub fn destination(&self, id: QueueId) -> Option<Destination> {
        self.queue(id).and_then(|q| q.dest)
    }

    /// Packets queued (not counting those being written).
    pub fn depth(&self, id: QueueId) -> usize {
        self.queue(id).map_or(0, |q| q.count)
    }

    /// Packets being written, as last set by [`take`](Self::take) or [`set_in_flight`](Self::set_in_flight).
    pub fn in_flight(&self, id: QueueId) -> usize {
        self.queue(id).map_or(0, |q| q.in_flight)
    }

    /// Packets rejected as `queue_full` on queue `id`.
    pub fn dropped(&self, id: QueueId) -> u64 {
        self.queue(id).map_or(0, |q| q.dropped)
    }

    /// Packets that did not fit a provisional queue (0 once adopted).
    pub fn overflow(&self, id: QueueId) -> usize {
        self.queue(id).map_or(0, |q| q.overflow)
    }

    /// The framed packets queued, without taking them.
    pub fn peek(&self, id: QueueId) -> &[u8] {
        self.queue(id).map_or(&[], |q| q.framed.as_slice())
    }

    fn insert(&mut self, key: String, dest: Option<Destination>, provisional: bool) -> QueueId {
        let queue = Queue {
            key: key.clone(),
            dest,
            framed: Vec::new(),
            count: 0,
            size_hint: 0,
            in_flight: 0,
            dropped: 0,
            overflow: 0,
            provisional,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id] = Some(queue);
                id
            }
            None => {
                self.slots.push(Some(queue));
                self.slots.len() - 1
            }
        };
        self.by_key.insert(key, id);
        if let Some(dest) = dest {
            self.by_dest.insert(dest, id);
        }
        id
    }

    /// The queue of `key`, created (empty) if there is none. A provisional queue is adopted: its overflow
    /// is counted as `queue_full` from now on. Returns its id and whether it was created or adopted.
    pub fn add(&mut self, key: &str) -> (QueueId, bool) {
        match self.id(key) {
            Some(id) => {
                let mut adopted = false;
                let mut overflow = 0;
                if let Some(q) = self.queue_mut(id) {
                    if q.provisional {
                        q.provisional = false;
                        overflow = std::mem::take(&mut q.overflow);
                        q.dropped += overflow as u64;
                        adopted = true;
                    }
                }
                self.rejected.queue_full += overflow as u64;
                (id, adopted)
            }
            None => (self.insert(key.to_owned(), None, false), true),
        }
    }

    /// Removes the queue of `key` with its packets; returns how many packets it held (for a provisional
    /// queue, its overflow included: all of them are the caller's to count). 0 if there is no such queue.
    pub fn remove(&mut self, key: &str) -> usize {
        let Some(id) = self.by_key.remove(key) else {
            return 0;
        };
        let Some(queue) = self.slots.get_mut(id).and_then(Option::take) else {
            return 0;
        };
        self.free.push(id);
        if let Some(dest) = queue.dest {
            if self.by_dest.get(&dest) == Some(&id) {
                self.by_dest.remove(&dest);
            }
        }
        queue.count + if queue.provisional { queue.overflow } else { 0 }
    }

    /// Removes every queue (the counters stay).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.free.clear();
        self.by_key.clear();
        self.by_dest.clear();
    }

    /// Empties queue `id` after the caller wrote what it held (the fast path: the packets are in flight on a
    /// connection, counted there, and do not count against this queue's bound); keeps the buffer for the
    /// next packets. Returns how many it held.
    pub fn sent_directly(&mut self, id: QueueId) -> usize {
        match self.queue_mut(id) {
            Some(q) => {
                q.framed.clear();
                std::mem::take(&mut q.count)
            }
            None => 0,
        }
    }

    /// Empties queue `id` (its packets are the caller's to count); returns how many it held.
    pub fn discard(&mut self, id: QueueId) -> usize {
        match self.queue_mut(id) {
            Some(q) => {
                q.framed = Vec::new();
                std::mem::take(&mut q.count)
            }
            None => 0,
        }
    }

    /// Takes everything queued on `id`: the framed buffer (swapped for an empty one) and its packet count.
    /// Those packets are in flight from now on (they count against the bound) until
    /// [`set_in_flight`](Self::set_in_flight) says otherwise.
    pub fn take(&mut self, id: QueueId) -> (Vec<u8>, usize) {
        match self.queue_mut(id) {
            Some(q) => {
                let count = std::mem::take(&mut q.count);
                q.in_flight = count;
                q.size_hint = q.framed.len().min(SIZE_HINT_MAX);
                (std::mem::take(&mut q.framed), count)
            }
            None => (Vec::new(), 0),
        }
    }

    /// How many packets of queue `id` are being written (0 once a write is over): the queue holds at most
    /// `capacity - in_flight` more.
    pub fn set_in_flight(&mut self, id: QueueId, in_flight: usize) {
        if let Some(q) = self.queue_mut(id) {
            q.in_flight = in_flight;
        }
    }

    /// Routes every packet of a batch to the queue of its destination key (order kept per key); see
    /// [`Pushed`]. With `vnet_header`, each entry starts with a `virtio_net_hdr` (see the module docs).
    pub fn push_packets<'a, I>(&mut self, packets: I, vnet_header: bool) -> Pushed
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let mut pushed = Pushed::default();
        for entry in packets {
            self.route(entry, vnet_header, &mut pushed);
        }
        pushed
    }

    /// [`push_packets`](Self::push_packets) for entries laid end to end in `buffer` with the given lengths
    /// (the shape of a batched TUN read). Fails, queueing nothing, when the lengths need more bytes than the
    /// buffer holds.
    pub fn push_buffer(
        &mut self,
        buffer: &[u8],
        lengths: &[u32],
        vnet_header: bool,
    ) -> Result<Pushed, SplitError> {
        let needed = lengths.iter().fold(0usize, |a, &l| a.saturating_add(l as usize));
        if needed > buffer.len() {
            return Err(SplitError {
                needed,
                available: buffer.len(),
            });
        }
        let mut offset = 0usize;
        Ok(self.push_packets(
            lengths.iter().map(|&len| {
                let entry = &buffer[offset..offset + len as usize];
                offset += len as usize;
                entry
            }),
            vnet_header,
        ))
    }

    /// Whether every entry of a TUN read (laid out as for [`push_buffer`](Self::push_buffer)) is a valid
    /// packet for an existing, empty queue that `fast` accepts, nothing pushed: the test the data plane's
    /// thread makes before it pushes a read itself (anything else, a new destination, a drop to count, a
    /// worker to wake, is left to the caller's loop, which pushes the read then).
    pub fn all_fast(
        &self,
        buffer: &[u8],
        lengths: &[u32],
        vnet_header: bool,
        fast: impl Fn(QueueId) -> bool,
    ) -> bool {
        let mut offset = 0usize;
        for &len in lengths {
            let Some(entry) = buffer.get(offset..offset.saturating_add(len as usize)) else {
                return false;
            };
            offset += len as usize;
            let packet = if vnet_header {
                match entry.split_first_chunk::<VNET_HDR_LEN>() {
                    Some((_, packet)) => packet,
                    None => return false,
                }
            } else {
                entry
            };
            if packet.is_empty() || packet.len() > self.max_packet_len {
                return false;
            }
            let Ok(dest) = destination(packet) else {
                return false;
            };
            match self.by_dest.get(&dest) {
                Some(&id) if self.depth(id) == 0 && fast(id) => {}
                _ => return false,
            }
        }
        true
    }

    #[inline]
    fn route(&mut self, entry: &[u8], vnet_header: bool, pushed: &mut Pushed) {
        let (header, packet) = if vnet_header {
            match entry.split_first_chunk::<VNET_HDR_LEN>() {
                Some((header, packet)) => (Some(header).filter(|h| h.iter().any(|&b| b != 0)), packet),
                None => {
                    self.rejected.invalid_packet += 1;
                    return;
                }
            }
        } else {
            (None, entry)
        };
        if packet.is_empty() || packet.len() > self.max_packet_len {
            self.rejected.invalid_packet += 1;
            return;
        }
        let Ok(dest) = destination(packet) else {
            self.rejected.invalid_packet += 1;
            return;
        };
        let id = match self.by_dest.get(&dest) {
            Some(&id) => id,
            None => self.resolve(dest, pushed),
        };
        self.enqueue(id, header, packet, pushed);
    }

    /// The queue of a destination not in the index: found by its key text (a queue added by key), or a
    /// new provisional one.
    #[cold]
    fn resolve(&mut self, dest: Destination, pushed: &mut Pushed) -> QueueId {
        let text = dest.key_text();
        if let Some(id) = self.id(text.as_str()) {
            if let Some(q) = self.queue_mut(id) {
                if q.dest.is_none() {
                    q.dest = Some(dest);
                    self.by_dest.insert(dest, id);
                }
            }
            return id;
        }
        let id = self.insert(text.as_str().to_owned(), Some(dest), true);
        pushed.new.push(id);
        id
    }

    #[inline]
    fn enqueue(
        &mut self,
        id: QueueId,
        header: Option<&[u8; VNET_HDR_LEN]>,
        packet: &[u8],
        pushed: &mut Pushed,
    ) {
        let (capacity, half, max) = (self.capacity, self.half, self.max_packet_len);
        let Some(q) = self.slots.get_mut(id).and_then(Option::as_mut) else {
            return; // unreachable: the indexes only hold live queues
        };
        if q.count >= capacity.saturating_sub(q.in_flight) {
            if q.provisional {
                q.overflow += 1;
            } else {
                q.dropped += 1;
                self.rejected.queue_full += 1;
            }
            pushed.pressure = true;
            return;
        }
        if q.count >= half {
            pushed.pressure = true;
        }
        if q.framed.capacity() == 0 {
            q.framed.reserve(q.size_hint);
        }
        match header {
            None => {
                if encode_frames_into(std::iter::once(packet), max, &mut q.framed).is_err() {
                    self.rejected.invalid_packet += 1; // unreachable: the length was checked
                    return;
                }
            }
            Some(header) => {
                // A packet that only needs its checksum (the kernel left it partial: TUN_F_CSUM) goes as a
                // plain frame with the checksum completed here: 10 bytes less on the wire per packet, and
                // any receiver takes it. Only super-packets travel as offload frames.
                if !frame_with_checksum(header, packet, max, &mut q.framed) {
                    if encode_offload_frame_into(header, packet, &mut q.framed).is_err() {
                        self.rejected.invalid_packet += 1; // unreachable: the length was checked
                        return;
                    }
                    self.offload_frames += 1;
                }
            }
        }
        q.count += 1;
        if !q.provisional {
            pushed.accepted += 1;
            if q.count == 1 {
                pushed.ready.push(id);
            }
        }
    }

    /// Queues one packet under a caller-given key (any text; the same queue as a parsed packet whose
    /// destination key is that text). See [`KeyedPush`].
    #[inline]
    pub fn push_keyed(&mut self, key: &str, packet: &[u8]) -> KeyedPush {
        if packet.is_empty() || packet.len() > self.max_packet_len {
            self.rejected.invalid_packet += 1;
            return KeyedPush::Invalid;
        }
        let Some(id) = self.id(key) else {
            return KeyedPush::Unknown;
        };
        let mut pushed = Pushed::default();
        let before = self.depth(id);
        if self.queue(id).is_some_and(|q| q.provisional) {
            return KeyedPush::Unknown; // not adopted yet: the caller has not decided
        }
        self.enqueue(id, None, packet, &mut pushed);
        if pushed.accepted == 0 {
            KeyedPush::Full
        } else if before == 0 {
            KeyedPush::Ready
        } else if before >= self.half {
            KeyedPush::Pressure
        } else {
            KeyedPush::Queued
        }
    }
}

/// One frame of a queue's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The `virtio_net_hdr` of an offload frame.
    pub vnet_header: Option<&'a [u8]>,
    /// The packet.
    pub packet: &'a [u8],
}

/// A framed buffer that does not end on a frame boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MalformedFrames {
    /// Where the bad frame starts.
    pub offset: usize,
}

impl core::fmt::Display for MalformedFrames {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "framed buffer truncated or malformed at byte {}", self.offset)
    }
}

impl std::error::Error for MalformedFrames {}

/// The frames of a queue's buffer (plain and offload frames), in order; an error ends the iteration.
pub fn frames(data: &[u8]) -> Frames<'_> {
    Frames { data, offset: 0 }
}

/// Iterator of [`frames`].
#[derive(Clone, Debug)]
pub struct Frames<'a> {
    data: &'a [u8],
    offset: usize,
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Frame<'a>, MalformedFrames>;

    fn next(&mut self) -> Option<Self::Item> {
        let start = self.offset;
        let rest = self.data.get(start..)?;
        if rest.is_empty() {
            return None;
        }
        let malformed = MalformedFrames { offset: start };
        let Some((prefix, rest)) = rest.split_first_chunk::<LENGTH_PREFIX_LEN>() else {
            self.offset = self.data.len();
            return Some(Err(malformed));
        };
        let word = u32::from_be_bytes(*prefix);
        let len = (word & !OFFLOAD_FLAG) as usize;
        let offload = word & OFFLOAD_FLAG != 0;
        let Some(payload) = rest.get(..len).filter(|_| !offload || len >= VNET_HDR_LEN) else {
            self.offset = self.data.len();
            return Some(Err(malformed));
        };
        self.offset = start + LENGTH_PREFIX_LEN + len;
        Some(Ok(if offload {
            let (header, packet) = payload.split_at(VNET_HDR_LEN);
            Frame {
                vnet_header: Some(header),
                packet,
            }
        } else {
            Frame {
                vnet_header: None,
                packet: payload,
            }
        }))
    }
}

/// The payload bytes of the first `limit` frames of `data`: what follows each length prefix (the packet, and
/// for an offload frame its `virtio_net_hdr` too, which travels with it). For whole plain buffers this is
/// `data.len() - 4 * frames`.
pub fn payload_bytes(data: &[u8], limit: usize) -> Result<usize, MalformedFrames> {
    frames(data).take(limit).try_fold(0usize, |total, frame| {
        let frame = frame?;
        Ok(total + frame.vnet_header.map_or(0, <[u8]>::len) + frame.packet.len())
    })
}

/// `data` without the frames at the given indices (ascending or not; out-of-range indices are ignored),
/// and how many frames it keeps.
pub fn without_frames(data: &[u8], skip: &[usize]) -> Result<(Vec<u8>, usize), MalformedFrames> {
    let mut out = Vec::with_capacity(data.len());
    let mut kept = 0;
    let mut offset = 0;
    for (i, frame) in frames(data).enumerate() {
        let frame = frame?;
        let size = LENGTH_PREFIX_LEN + frame.vnet_header.map_or(0, <[u8]>::len) + frame.packet.len();
        if !skip.contains(&i) {
            out.extend_from_slice(&data[offset..offset + size]);
            kept += 1;
        }
        offset += size;
    }
    Ok((out, kept))
}

/// Appends `packet` as a plain frame with its checksum completed, when `header` asks for nothing but that
/// (no segmentation); false (nothing appended) otherwise.
fn frame_with_checksum(header: &[u8; VNET_HDR_LEN], packet: &[u8], max: usize, out: &mut Vec<u8>) -> bool {
    let Ok(hdr) = gso::VirtioNetHdr::parse(header) else {
        return false;
    };
    if hdr.is_gso() || hdr.gso_type != gso::gso_type::NONE {
        return false;
    }
    let start = out.len();
    if encode_frames_into(std::iter::once(packet), max, out).is_err() {
        return false;
    }
    if gso::complete_checksum(&hdr, &mut out[start + LENGTH_PREFIX_LEN..]).is_err() {
        out.truncate(start);
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn udp4(dst_last: u8, dport: u16, seq: u8) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 29, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, dst_last,
        ];
        p.extend_from_slice(&[0, 1]);
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0, 9, 0, 0, seq]);
        p
    }

    fn packets_of(q: &DestinationQueues, key: &str) -> Vec<Vec<u8>> {
        let id = q.id(key).unwrap();
        frames(q.peek(id)).map(|f| f.unwrap().packet.to_vec()).collect()
    }

    fn adopt_all(q: &mut DestinationQueues, pushed: &Pushed) -> usize {
        let keys: Vec<String> = pushed
            .new
            .iter()
            .map(|&id| q.key(id).unwrap().to_owned())
            .collect();
        keys.iter()
            .map(|k| {
                let id = q.add(k).0;
                q.depth(id)
            })
            .sum()
    }

    #[test]
    fn new_keys_are_provisional_until_adopted_and_order_is_kept() {
        let mut q = DestinationQueues::new(10, 65535);
        let batch = [udp4(2, 80, 0), udp4(3, 80, 1), vec![0x45], udp4(2, 80, 2)];
        let pushed = q.push_packets(batch.iter().map(Vec::as_slice), false);
        assert_eq!(pushed.accepted, 0);
        assert!(pushed.ready.is_empty());
        let keys: Vec<&str> = pushed.new.iter().map(|&id| q.key(id).unwrap()).collect();
        assert_eq!(keys, ["10.0.0.2:80", "10.0.0.3:80"]);
        assert_eq!(q.rejected().invalid_packet, 1);
        assert_eq!(q.push_keyed("10.0.0.2:80", b"x"), KeyedPush::Unknown);
        assert_eq!(adopt_all(&mut q, &pushed), 3);
        assert_eq!(packets_of(&q, "10.0.0.2:80"), [udp4(2, 80, 0), udp4(2, 80, 2)]);
        // Now known: the next push reports no new key, and no ready key (not empty).
        let pushed = q.push_packets([udp4(2, 80, 3).as_slice()], false);
        assert_eq!((pushed.accepted, pushed.new.len(), pushed.ready.len()), (1, 0, 0));
    }

    #[test]
    fn ready_only_when_empty_before() {
        let mut q = DestinationQueues::new(10, 65535);
        let (id, created) = q.add("10.0.0.2:80");
        assert!(created);
        let pushed = q.push_packets([udp4(2, 80, 0).as_slice(), udp4(2, 80, 1).as_slice()], false);
        assert_eq!(
            (pushed.accepted, pushed.ready.clone(), pushed.new.len()),
            (2, vec![id], 0)
        );
        let pushed = q.push_packets([udp4(2, 80, 2).as_slice()], false);
        assert!(pushed.ready.is_empty());
        let (data, n) = q.take(id);
        assert_eq!(n, 3);
        assert_eq!(frames(&data).count(), 3);
        assert_eq!(q.depth(id), 0);
        assert_eq!(q.in_flight(id), 3);
        let pushed = q.push_packets([udp4(2, 80, 3).as_slice()], false);
        assert_eq!(pushed.ready, [id]);
    }

    #[test]
    fn bound_counts_in_flight_and_overflow() {
        let mut q = DestinationQueues::new(4, 65535);
        let (id, _) = q.add("k");
        for i in 0..3 {
            assert_ne!(q.push_keyed("k", &[i]), KeyedPush::Full);
        }
        q.take(id); // 3 in flight: room for 1
        assert_eq!(q.push_keyed("k", b"a"), KeyedPush::Ready);
        assert_eq!(q.push_keyed("k", b"b"), KeyedPush::Full);
        assert_eq!((q.dropped(id), q.rejected().queue_full), (1, 1));
        q.set_in_flight(id, 0);
        assert_eq!(q.push_keyed("k", b"c"), KeyedPush::Queued);
        assert_eq!(q.push_keyed("k", b"d"), KeyedPush::Pressure);
        assert_eq!(q.push_keyed("", b""), KeyedPush::Invalid);
        assert_eq!(q.push_keyed("nope", b"x"), KeyedPush::Unknown);
        assert_eq!(q.rejected().invalid_packet, 1);
    }

    #[test]
    fn provisional_overflow_is_counted_on_adoption_or_returned_on_removal() {
        let mut q = DestinationQueues::new(2, 65535);
        let batch: Vec<Vec<u8>> = (0..5).map(|i| udp4(2, 80, i)).collect();
        let pushed = q.push_packets(batch.iter().map(Vec::as_slice), false);
        let id = pushed.new[0];
        assert_eq!((q.depth(id), q.overflow(id), q.rejected().queue_full), (2, 3, 0));
        assert!(pushed.pressure);
        assert_eq!(q.remove("10.0.0.2:80"), 5);
        assert!(q.is_empty());
        let pushed = q.push_packets(batch.iter().map(Vec::as_slice), false);
        let id = pushed.new[0];
        q.add("10.0.0.2:80");
        assert_eq!((q.depth(id), q.dropped(id), q.rejected().queue_full), (2, 3, 3));
    }

    #[test]
    fn keyed_and_parsed_packets_share_a_key() {
        let mut q = DestinationQueues::new(10, 65535);
        q.add("10.0.0.2:80");
        assert_eq!(q.push_keyed("10.0.0.2:80", b"raw"), KeyedPush::Ready);
        let pushed = q.push_packets([udp4(2, 80, 0).as_slice()], false);
        assert_eq!((pushed.accepted, pushed.new.len()), (1, 0));
        assert_eq!(packets_of(&q, "10.0.0.2:80"), [b"raw".to_vec(), udp4(2, 80, 0)]);
        assert_eq!(q.remove("10.0.0.2:80"), 2);
        // The destination index forgot it too: the next packet makes a new provisional queue.
        let pushed = q.push_packets([udp4(2, 80, 1).as_slice()], false);
        assert_eq!(pushed.new.len(), 1);
    }

    #[test]
    fn a_packet_that_only_needs_its_checksum_goes_as_a_plain_frame_with_it_completed() {
        let mut q = DestinationQueues::new(10, 65535);
        q.add("10.0.0.2:80");
        let mut packet = udp4(2, 80, 7);
        // What the kernel hands out with TUN_F_CSUM: the UDP checksum field holds the pseudo-header sum.
        let pseudo: u32 = [0x0a00u32, 0x0001, 0x0a00, 0x0002, 17, 9].iter().sum();
        let folded = ((pseudo & 0xffff) + (pseudo >> 16)) as u16;
        packet[26..28].copy_from_slice(&folded.to_be_bytes());
        let header = gso::VirtioNetHdr {
            flags: gso::flags::NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 6,
            ..gso::VirtioNetHdr::NONE
        };
        let mut buffer = header.to_bytes().to_vec();
        buffer.extend_from_slice(&packet);
        let pushed = q.push_buffer(&buffer, &[buffer.len() as u32], true).unwrap();
        assert_eq!((pushed.accepted, q.offload_frames()), (1, 0));
        let sent = packets_of(&q, "10.0.0.2:80").remove(0);
        let parsed = etherparse::SlicedPacket::from_ip(&sent).unwrap();
        let (Some(etherparse::NetSlice::Ipv4(ip)), Some(etherparse::TransportSlice::Udp(udp))) =
            (parsed.net, parsed.transport)
        else {
            panic!("not UDP over IPv4");
        };
        let expected = udp
            .to_header()
            .calc_checksum_ipv4(&ip.header().to_header(), udp.payload())
            .unwrap();
        assert_eq!(udp.checksum(), expected);
        assert_eq!(&sent[..26], &packet[..26]);
    }

    #[test]
    fn vnet_headers_make_plain_or_offload_frames() {
        let mut q = DestinationQueues::new(10, 65535);
        q.add("10.0.0.2:80");
        let plain = udp4(2, 80, 1);
        let mut buffer = vec![0u8; VNET_HDR_LEN];
        buffer.extend_from_slice(&plain);
        let header = [1u8, 0, 0, 0, 0, 0, 0, 0, 0, 9];
        buffer.extend_from_slice(&header);
        buffer.extend_from_slice(&plain);
        buffer.extend_from_slice(&[0; 5]); // shorter than a header: invalid
        let n = (VNET_HDR_LEN + plain.len()) as u32;
        let pushed = q.push_buffer(&buffer, &[n, n, 5], true).unwrap();
        assert_eq!(pushed.accepted, 2);
        assert_eq!((q.offload_frames(), q.rejected().invalid_packet), (1, 1));
        let id = q.id("10.0.0.2:80").unwrap();
        let data = q.peek(id).to_vec();
        let mut expected = encode_frames_into_vec(&plain);
        expected.extend_from_slice(&((VNET_HDR_LEN + plain.len()) as u32 | OFFLOAD_FLAG).to_be_bytes());
        expected.extend_from_slice(&header);
        expected.extend_from_slice(&plain);
        assert_eq!(data, expected);
        let got: Vec<Frame> = frames(&data).map(Result::unwrap).collect();
        assert_eq!(
            got[0],
            Frame {
                vnet_header: None,
                packet: &plain
            }
        );
        assert_eq!(
            got[1],
            Frame {
                vnet_header: Some(&header),
                packet: &plain
            }
        );
        assert_eq!(payload_bytes(&data, 2), Ok(data.len() - 2 * LENGTH_PREFIX_LEN));
        assert_eq!(payload_bytes(&data, 1), Ok(plain.len()));
        let (kept, count) = without_frames(&data, &[0]).unwrap();
        assert_eq!(count, 1);
        assert_eq!(&kept[..], &data[4 + plain.len()..]);
    }

    fn encode_frames_into_vec(packet: &[u8]) -> Vec<u8> {
        crate::framing::encode_frames([packet], 65535).unwrap()
    }

    #[test]
    fn lengths_beyond_the_buffer_queue_nothing() {
        let mut q = DestinationQueues::new(10, 65535);
        let p = udp4(2, 80, 0);
        let err = q.push_buffer(&p, &[p.len() as u32, 1], false).unwrap_err();
        assert_eq!((err.needed, err.available), (p.len() + 1, p.len()));
        assert!(q.is_empty());
    }

    #[test]
    fn too_large_and_malformed() {
        let mut q = DestinationQueues::new(10, 100);
        let mut big = udp4(2, 80, 0);
        big.resize(101, 0);
        let pushed = q.push_packets([big.as_slice()], false);
        assert!(pushed.new.is_empty());
        assert_eq!(q.rejected().invalid_packet, 1);
        assert_eq!(
            frames(&[0, 0, 0, 5, 1]).next(),
            Some(Err(MalformedFrames { offset: 0 }))
        );
        assert_eq!(
            frames(&[0x80, 0, 0, 2, 1, 1]).next(),
            Some(Err(MalformedFrames { offset: 0 }))
        );
        assert!(payload_bytes(&[0, 0], 1).is_err());
    }

    proptest! {
        /// Against a model: per key, what was queued is what the pushes offered, in order, up to the bound;
        /// every offered packet is accepted, counted full, or counted invalid.
        #[test]
        fn matches_a_model(
            ops in proptest::collection::vec((0u8..4, 0u8..4, any::<bool>()), 0..200),
            capacity in 1usize..6,
        ) {
            let mut q = DestinationQueues::new(capacity, 65535);
            let mut model: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
            let mut accepted = 0usize;
            let mut taken = 0usize;
            for (seq, &(dest, kind, take)) in ops.iter().enumerate() {
                let packet = if kind == 0 { vec![0x45, 1] } else { udp4(dest, 80, seq as u8) };
                let offered = seq + 1;
                let pushed = q.push_packets([packet.as_slice()], false);
                accepted += pushed.accepted + adopt_all(&mut q, &pushed);
                if kind != 0 {
                    let key = format!("10.0.0.{dest}:80");
                    let queue = model.entry(key.clone()).or_default();
                    let id = q.id(&key).unwrap();
                    if queue.len() + q.in_flight(id) < capacity {
                        queue.push(packet);
                    }
                    prop_assert_eq!(packets_of(&q, &key), queue.clone());
                    if take {
                        let (data, n) = q.take(id);
                        prop_assert_eq!(n, queue.len());
                        let got: Vec<Vec<u8>> = frames(&data).map(|f| f.unwrap().packet.to_vec()).collect();
                        prop_assert_eq!(&got, &*queue);
                        taken += n;
                        queue.clear();
                        if seq % 3 == 0 {
                            q.set_in_flight(id, 0);
                        }
                    }
                }
                let r = q.rejected();
                prop_assert_eq!(offered, accepted + r.invalid_packet as usize + r.queue_full as usize);
            }
            let queued: usize = model.values().map(Vec::len).sum();
            prop_assert_eq!(accepted, taken + queued);
        }
    }
}
