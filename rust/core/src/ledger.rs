//! What one sending connection has written and the peer has not acknowledged yet, by batch, in write
//! order: the native half of `vpn_packet.transport.delivery.InFlight` (issue 20, item 3).
//!
//! Two kinds of writer share a connection. The dispatcher's Python worker writes batches whose fate a
//! `Receipt` carries (Python keeps those receipts; here such a batch is only its size, for the window). The
//! native fast path (a TUN read written straight into an established session by
//! `DestinationQueues`, see `rust/python/src/queues.rs`) writes batches that no Python object follows: their
//! fate is counted here, into the [`FastCounters`] of their destination and of the whole dispatcher, so
//! that "sent" stays "acknowledged by the peer" without a Python call per batch:
//!
//! - written: `in_flight` grows;
//! - acknowledged whole ([`Ledger::settle`]): `in_flight` shrinks, `sent` and `sent_bytes` grow;
//! - the connection ended first ([`Ledger::fail`]): the part the peer acknowledged is `sent`, the rest
//!   `lost` (the dispatcher's `lost_in_flight`), exactly as a receipt resolves.
//!
//! Bookkeeping only (no I/O, no clock), like its Python counterpart, so properties can drive it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Packets one destination (or the whole dispatcher) sent on the fast path, by fate. Shared (`Arc`)
/// between the destination's worker, which reads it, and the batches in flight, which move it.
#[derive(Debug, Default)]
pub struct FastCounters {
    in_flight: AtomicU64,
    sent: AtomicU64,
    sent_bytes: AtomicU64,
    lost: AtomicU64,
}

/// A snapshot of [`FastCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastCounts {
    /// Packets written and not acknowledged yet.
    pub in_flight: u64,
    /// Packets the peer acknowledged.
    pub sent: u64,
    /// Payload bytes of those packets (length prefixes not counted; an offload frame's header counted).
    pub sent_bytes: u64,
    /// Packets written whose connection ended before the peer acknowledged them.
    pub lost: u64,
}

impl FastCounters {
    pub fn counts(&self) -> FastCounts {
        FastCounts {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            sent_bytes: self.sent_bytes.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
        }
    }

    fn written(&self, frames: u64) {
        self.in_flight.fetch_add(frames, Ordering::Relaxed);
    }

    fn settled(&self, frames: u64, sent: u64, sent_bytes: u64) {
        self.in_flight.fetch_sub(frames, Ordering::Relaxed);
        self.sent.fetch_add(sent, Ordering::Relaxed);
        self.sent_bytes.fetch_add(sent_bytes, Ordering::Relaxed);
        self.lost.fetch_add(frames - sent, Ordering::Relaxed);
    }
}

/// Whose counters a fast batch moves: its destination's and the dispatcher's.
#[derive(Clone, Debug)]
pub struct FastOwner {
    pub destination: Arc<FastCounters>,
    pub total: Arc<FastCounters>,
}

impl FastOwner {
    fn written(&self, frames: u64) {
        self.destination.written(frames);
        self.total.written(frames);
    }

    fn settled(&self, frames: u64, sent: u64, sent_bytes: u64) {
        self.destination.settled(frames, sent, sent_bytes);
        self.total.settled(frames, sent, sent_bytes);
    }
}

#[derive(Debug)]
struct Batch {
    /// The connection's frame count after this batch.
    end: u64,
    frames: u64,
    /// Payload bytes (see [`FastCounts::sent_bytes`]).
    payload: u64,
    /// Bytes on the wire (the window counts these).
    wire: u64,
    /// A fast batch: its counters, and its frames' payload sizes (a partial acknowledgement counts the
    /// bytes of the frames it covers). `None`: a batch Python follows with a receipt.
    fast: Option<(FastOwner, Vec<u32>)>,
}

/// The batches of one connection, oldest first, until acknowledged; see the module documentation.
#[derive(Debug, Default)]
pub struct Ledger {
    batches: VecDeque<Batch>,
    written: u64,
    acked: u64,
    wire_in_flight: u64,
    fast_in_flight: u64,
    fast_frames: u64,
    fast_wire: u64,
    acked_payload: u64,
}

impl Ledger {
    /// A batch of `frames` frames (`wire` bytes, `payload` of them payload) was taken by the connection.
    /// `fast`: its owner and its frames' payload sizes, for a fast-path batch.
    pub fn written(&mut self, frames: u64, wire: u64, payload: u64, fast: Option<(FastOwner, Vec<u32>)>) {
        self.written += frames;
        self.wire_in_flight += wire;
        if let Some((owner, _)) = &fast {
            owner.written(frames);
            self.fast_in_flight += frames;
            self.fast_frames += frames;
            self.fast_wire += wire;
        }
        self.batches.push_back(Batch {
            end: self.written,
            frames,
            payload,
            wire,
            fast,
        });
    }

    /// The peer has taken `acked` frames of this connection in all: every batch it covers whole is settled
    /// (fast ones counted sent). An ack beyond what was written is ignored here: the connection refuses
    /// it before (`AckError`), and the caller ends the connection.
    pub fn settle(&mut self, acked: u64) {
        if acked <= self.acked || acked > self.written {
            return;
        }
        self.acked = acked;
        while let Some(batch) = self.batches.front() {
            if batch.end > acked {
                break;
            }
            let batch = self.batches.pop_front().expect("front exists");
            self.wire_in_flight -= batch.wire;
            self.acked_payload += batch.payload;
            if let Some((owner, _)) = &batch.fast {
                owner.settled(batch.frames, batch.frames, batch.payload);
                self.fast_in_flight -= batch.frames;
            }
        }
    }

    /// The connection is gone: every open batch resolves with the part the peer acknowledged (see
    /// [`Ledger::settle`], called first with the last ack). Returns the fast-path frames lost.
    pub fn fail(&mut self) -> u64 {
        let mut lost = 0;
        while let Some(batch) = self.batches.pop_front() {
            let start = batch.end - batch.frames;
            let taken = self.acked.saturating_sub(start).min(batch.frames);
            if let Some((owner, sizes)) = &batch.fast {
                let bytes = sizes.iter().take(taken as usize).map(|&s| u64::from(s)).sum();
                owner.settled(batch.frames, taken, bytes);
                lost += batch.frames - taken;
            }
        }
        self.wire_in_flight = 0;
        self.fast_in_flight = 0;
        self.written = self.acked;
        lost
    }

    /// Bytes on the wire written and not acknowledged (both writers): what the in-flight window bounds.
    pub fn wire_in_flight(&self) -> u64 {
        self.wire_in_flight
    }

    /// Fast-path frames written and not acknowledged.
    pub fn fast_in_flight(&self) -> u64 {
        self.fast_in_flight
    }

    /// Frames the fast path wrote on this connection.
    pub fn fast_frames(&self) -> u64 {
        self.fast_frames
    }

    /// Bytes on the wire the fast path wrote on this connection.
    pub fn fast_wire(&self) -> u64 {
        self.fast_wire
    }

    /// Payload bytes of the batches acknowledged whole (both writers).
    pub fn acked_payload(&self) -> u64 {
        self.acked_payload
    }
}

impl Drop for Ledger {
    /// A session dropped without its end being reported still settles its fast batches: nothing written
    /// is ever left uncounted.
    fn drop(&mut self) {
        self.fail();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> FastOwner {
        FastOwner {
            destination: Arc::new(FastCounters::default()),
            total: Arc::new(FastCounters::default()),
        }
    }

    #[test]
    fn fast_batches_count_sent_when_acknowledged_whole_and_lost_for_the_rest_at_the_end() {
        let (mut ledger, fast) = (Ledger::default(), owner());
        ledger.written(2, 108, 100, None); // a worker's batch: frames 1-2
        ledger.written(3, 162, 150, Some((fast.clone(), vec![50, 50, 50]))); // frames 3-5
        ledger.written(1, 54, 50, Some((fast.clone(), vec![50]))); // frame 6
        let c = fast.destination.counts();
        assert_eq!((c.in_flight, c.sent), (4, 0));
        assert_eq!((ledger.wire_in_flight(), ledger.fast_in_flight()), (324, 4));
        ledger.settle(4); // inside the fast batch: nothing of it counted yet
        assert_eq!(fast.destination.counts().sent, 0);
        assert_eq!((ledger.wire_in_flight(), ledger.acked_payload()), (216, 100));
        assert_eq!(ledger.fail(), 2, "frame 5 and frame 6 were never acknowledged");
        let c = fast.destination.counts();
        assert_eq!(
            c,
            FastCounts {
                in_flight: 0,
                sent: 2,
                sent_bytes: 100,
                lost: 2
            }
        );
        assert_eq!(fast.total.counts(), c);
        assert_eq!(ledger.wire_in_flight(), 0);
    }

    #[test]
    fn an_ack_covering_everything_settles_every_batch_and_a_dropped_ledger_settles_the_rest() {
        let fast = owner();
        {
            let mut ledger = Ledger::default();
            ledger.written(1, 54, 50, Some((fast.clone(), vec![50])));
            ledger.written(1, 54, 50, Some((fast.clone(), vec![50])));
            ledger.settle(1);
            ledger.settle(1); // repeated: nothing more
            ledger.settle(7); // beyond what was written: refused before, ignored here
            assert_eq!(fast.destination.counts().sent, 1);
        }
        let c = fast.destination.counts();
        assert_eq!((c.in_flight, c.sent, c.lost), (0, 1, 1));
    }
}
