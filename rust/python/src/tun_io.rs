//! The Python face of the TUN descriptor's I/O: conversions only. The system calls and their rules live in
//! the core ([`vpn_packet_core::tun`]); here `bytes` and lists become slices and counts become tuples. (The
//! receive path writes the TUN from its session: `rust/python/src/receive.rs`.)
//!
//! - `TunIo.read_into`: every packet ready on the non-blocking descriptor (until `EAGAIN` or a bound), read
//!   into one reused buffer and routed straight into a dispatcher's `DestinationQueues` (whose fast path
//!   writes an established destination's packets into its connection in the same call): no Python object
//!   and no copy of the packets per readiness event (issue 20, item 3).
//! - `TunIo.read_batch`: the same read, returned as one `bytes` plus one `bytes` of native-endian u32
//!   lengths (for a reader that wants the packets: tests, `Dispatcher.dispatch_buffer`).
//! - `TunIo.write_packets`: a batch of packets, one `write` (or `writev` with a virtio header) each.
//!
//! Why Rust: a `read()` or `write()` from Python costs about a microsecond of interpreter work per packet, and
//! profiles of the node showed those calls taking most of its time. Here a readiness event costs one call.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use vpn_packet_core::data_plane::{Source, Step};
use vpn_packet_core::framing::{MAX_FRAME_SIZE_LIMIT, VNET_HDR_LEN};
use vpn_packet_core::inbound::PLAIN_VNET_HDR;
use vpn_packet_core::tun::{self, FATAL_ERRNOS};

use crate::buffer::PacketBytes;
use crate::errors::no_panic;
use crate::functions::for_each_item;
use crate::queues::{push_off_loop, DestinationQueues, PushResult, Settled, SharedQueues};

/// Batch reads and writes on a TUN descriptor (which stays owned, and closed, by Python).
#[pyclass(module = "vpn_packet._native", name = "TunIo")]
pub struct TunIo {
    fd: RawFd,
    vnet_header: bool,
    packet_size: usize,
    buffer: Vec<u8>,
    lengths: Vec<u32>,
}

#[pymethods]
impl TunIo {
    /// `vnet_header`: the device was opened with `IFF_VNET_HDR` (every packet read or written is preceded
    /// by a 10-byte virtio_net_hdr). `packet_size`: the largest read (header included).
    #[new]
    #[pyo3(signature = (fd, *, vnet_header = false, packet_size = 65545))]
    fn new(fd: RawFd, vnet_header: bool, packet_size: usize) -> PyResult<Self> {
        check_descriptor(fd, packet_size)?;
        Ok(TunIo {
            fd,
            vnet_header,
            packet_size,
            buffer: Vec::new(),
            lengths: Vec::new(),
        })
    }

    /// Reads until `EAGAIN`, `max_packets` or about `max_bytes`: `(data, lengths, errno)`, `lengths` being
    /// native-endian u32 (one per packet, header included when `vnet_header`), `errno` that of the error
    /// that stopped the read (0: none; `EAGAIN` is not an error). The GIL is released meanwhile.
    #[pyo3(signature = (max_packets = 1024, max_bytes = 4194304))]
    fn read_batch<'py>(
        &mut self,
        py: Python<'py>,
        max_packets: usize,
        max_bytes: usize,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>, i32)> {
        no_panic(|| {
            let (fd, size) = (self.fd, self.packet_size);
            let (buffer, lengths) = (&mut self.buffer, &mut self.lengths);
            let result = py.detach(|| tun::read_batch(fd, buffer, lengths, size, max_packets, max_bytes));
            let data = PyBytes::new(py, &self.buffer[..result.total]);
            let lengths = PyBytes::new(py, u32_bytes(&self.lengths));
            Ok((data, lengths, result.errno))
        })
    }

    /// Reads like `read_batch` and routes what it read into `queues` (as `DestinationQueues.push_buffer`
    /// with `vnet_header`, the fast path included) in the same call: `(pushed, packets, bytes, errno)`,
    /// `pushed` being the push's result (see `DestinationQueues`), `bytes` those read (headers included).
    /// The GIL is released for the reads.
    #[pyo3(signature = (queues, *, vnet_header = false, max_packets = 1024, max_bytes = 4194304))]
    fn read_into<'py>(
        &mut self,
        py: Python<'py>,
        queues: &Bound<'py, DestinationQueues>,
        vnet_header: bool,
        max_packets: usize,
        max_bytes: usize,
    ) -> PyResult<(PushResult<'py>, usize, usize, i32)> {
        no_panic(|| {
            let (fd, size) = (self.fd, self.packet_size);
            let (buffer, lengths) = (&mut self.buffer, &mut self.lengths);
            let result = py.detach(|| tun::read_batch(fd, buffer, lengths, size, max_packets, max_bytes));
            let pushed = queues.borrow_mut().push_read(
                py,
                &self.buffer[..result.total],
                &self.lengths,
                vnet_header,
            )?;
            Ok((pushed, self.lengths.len(), result.total, result.errno))
        })
    }

    /// Writes `packets` in order (plain IP packets; an all-zero virtio header is added when
    /// `vnet_header`): `(written, bytes, refused, dropped, fatal_errno)`. The batch stops at the first packet
    /// the device has no room for (`EAGAIN`) or at a fatal error, the rest counted in `dropped`: there is no
    /// backlog. The GIL is released meanwhile.
    fn write_packets(
        &self,
        py: Python<'_>,
        packets: &Bound<'_, PyAny>,
    ) -> PyResult<(u64, u64, u64, u64, i32)> {
        no_panic(|| {
            let mut held: Vec<PacketBytes<'_>> = Vec::new();
            for_each_item(packets, |item| {
                held.push(PacketBytes::get(item)?);
                Ok(())
            })?;
            let slices: Vec<&[u8]> = held.iter().map(PacketBytes::as_slice).collect();
            let (fd, header) = (self.fd, self.vnet_header.then_some(&PLAIN_VNET_HDR[..]));
            let w = py.detach(|| tun::write_batch(fd, header, slices.iter().copied()));
            Ok((w.written, w.bytes, w.refused, w.dropped, w.fatal_errno))
        })
    }

    fn __repr__(&self) -> String {
        format!("TunIo(fd={}, vnet_header={})", self.fd, self.vnet_header)
    }
}

/// What the data plane's thread left for the loop when it handed the feed back.
enum Held {
    Nothing,
    /// A read it did not push (not every packet was for an idle fast route, or the read failed).
    Read {
        total: usize,
        errno: i32,
    },
    /// A read it pushed that left work for the loop (a worker to wake, pressure) or `on_blocked` calls.
    Pushed {
        settled: Settled,
        packets: usize,
        total: usize,
    },
}

/// Reads the thread did itself: `(events, packets, bytes, max_batch)` (bytes with virtio headers).
#[derive(Default, Clone, Copy)]
struct FeedStats {
    events: u64,
    packets: u64,
    bytes: u64,
    max_batch: u64,
}

struct FeedState {
    fd: RawFd,
    vnet_header: bool,
    packet_size: usize,
    max_packets: usize,
    max_bytes: usize,
    /// A read of at least this many packets is a flood: the next read waits `flood_pause` for its batch.
    flood_batch: usize,
    flood_pause: Duration,
    buffer: Vec<u8>,
    lengths: Vec<u32>,
    /// The dispatcher's queues, shared (the thread pushes without the GIL).
    core: SharedQueues,
    watched: bool,
    held: Held,
    stats: FeedStats,
}

pub(crate) struct FeedSource {
    state: Mutex<FeedState>,
}

fn lock(mutex: &Mutex<FeedState>) -> MutexGuard<'_, FeedState> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl FeedState {
    fn park(&mut self, held: Held) -> Step {
        self.held = held;
        self.watched = false;
        Step::Park
    }
}

/// On the data plane's thread: a TUN readiness event read, then pushed into the dispatcher's queues only
/// when every packet goes to a destination on the fast path (written into its connection in the push):
/// the steady flow, without the GIL or any Python code. Anything else (a new destination, a worker to
/// wake, a drop to count, a read error, a socket that pushed back) parks the feed with what it holds, for
/// the loop.
impl Source for FeedSource {
    fn fd(&self) -> RawFd {
        lock(&self.state).fd
    }

    fn readable(&self) -> Step {
        let mut guard = lock(&self.state);
        let s = &mut *guard;
        if !s.watched {
            return Step::Idle;
        }
        let result = tun::read_batch(
            s.fd,
            &mut s.buffer,
            &mut s.lengths,
            s.packet_size,
            s.max_packets,
            s.max_bytes,
        );
        let (packets, total) = (s.lengths.len(), result.total);
        if result.errno != 0 {
            return s.park(Held::Read {
                total,
                errno: result.errno,
            });
        }
        if packets == 0 {
            return Step::Idle;
        }
        match push_off_loop(&s.core, &s.buffer[..total], &s.lengths, s.vnet_header) {
            None => s.park(Held::Read { total, errno: 0 }),
            Some(settled) if settled.leaves_work() || !settled.blocked.is_empty() => s.park(Held::Pushed {
                settled,
                packets,
                total,
            }),
            Some(_) => {
                let st = &mut s.stats;
                st.events += 1;
                st.packets += packets as u64;
                st.bytes += total as u64;
                st.max_batch = st.max_batch.max(packets as u64);
                if packets >= s.flood_batch {
                    Step::Pause(s.flood_pause)
                } else {
                    Step::Idle
                }
            }
        }
    }

    fn due(&self) -> Step {
        Step::Idle
    }
}

type ParkedRead<'py> = (Option<PushResult<'py>>, usize, usize, i32);

/// A TUN device's reads on the data plane's thread, into a dispatcher's queues (`DataPlane.watch_tun`):
/// the thread reads each readiness event and pushes it itself when every packet is for an idle fast route
/// (see `DestinationQueues.set_fast`); otherwise it hands the feed back with the read, which the loop pushes
/// (`take_parked`). The descriptor stays Python's.
#[pyclass(module = "vpn_packet._native", name = "TunFeed")]
pub struct TunFeed {
    pub(crate) shared: Arc<FeedSource>,
    pub(crate) token: Option<u64>,
    queues: Py<DestinationQueues>,
}

impl TunFeed {
    /// The state, locked without holding the GIL while waiting (the thread never takes the GIL, but a
    /// wait with it would stall every other Python thread).
    fn locked<'a>(&'a self, py: Python<'_>) -> MutexGuard<'a, FeedState> {
        let state = &self.shared.state;
        loop {
            match state.try_lock() {
                Ok(guard) => return guard,
                Err(TryLockError::Poisoned(poisoned)) => return poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => py.detach(|| drop(lock(state))),
            }
        }
    }

    pub(crate) fn set_watched(&self, py: Python<'_>, watched: bool) {
        self.locked(py).watched = watched;
    }
}

#[pymethods]
impl TunFeed {
    #[new]
    #[pyo3(signature = (fd, queues, *, vnet_header = false, packet_size = 65545, max_packets = 1024, max_bytes = 4194304, flood_batch = 16, flood_pause = 0.0001))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        fd: RawFd,
        queues: Py<DestinationQueues>,
        vnet_header: bool,
        packet_size: usize,
        max_packets: usize,
        max_bytes: usize,
        flood_batch: usize,
        flood_pause: f64,
    ) -> PyResult<Self> {
        if !(0.0..=0.1).contains(&flood_pause) {
            return Err(PyValueError::new_err(format!(
                "flood_pause must be 0..=0.1 seconds, got {flood_pause}"
            )));
        }
        check_descriptor(fd, packet_size)?;
        let core = Arc::clone(&queues.borrow(py).core);
        Ok(TunFeed {
            shared: Arc::new(FeedSource {
                state: Mutex::new(FeedState {
                    fd,
                    vnet_header,
                    packet_size,
                    max_packets,
                    max_bytes,
                    flood_batch: flood_batch.max(1),
                    flood_pause: Duration::from_secs_f64(flood_pause),
                    buffer: Vec::new(),
                    lengths: Vec::new(),
                    core,
                    watched: false,
                    held: Held::Nothing,
                    stats: FeedStats::default(),
                }),
            }),
            token: None,
            queues,
        })
    }

    /// What the thread left when it handed the feed back, made the loop's: `(pushed, packets, bytes,
    /// errno)`. A read it did not push is pushed now, on the loop (as `TunIo.read_into` does: `pushed` is
    /// that push's result), unless `accepting` is False (then `pushed` is None and the packets are the
    /// caller's to count as rejected). A read it pushed gives that push's result (`accepted` 0 when the
    /// thread counted them itself, `DestinationQueues.accepted_off_loop`); the `on_blocked` calls its fast
    /// writes owe are made.
    fn take_parked<'py>(&self, py: Python<'py>, accepting: bool) -> PyResult<ParkedRead<'py>> {
        no_panic(|| {
            let mut queues = self.queues.bind(py).borrow_mut();
            let mut guard = self.locked(py);
            let s = &mut *guard;
            match std::mem::replace(&mut s.held, Held::Nothing) {
                Held::Nothing => Ok((None, 0, 0, 0)),
                Held::Read { total, errno } => {
                    let packets = s.lengths.len();
                    if !accepting || packets == 0 {
                        return Ok((None, packets, total, errno));
                    }
                    let pushed = queues.push_read(py, &s.buffer[..total], &s.lengths, s.vnet_header)?;
                    Ok((Some(pushed), packets, total, errno))
                }
                Held::Pushed {
                    mut settled,
                    packets,
                    total,
                } => {
                    if !settled.leaves_work() {
                        settled.accepted = 0; // counted by the thread
                    }
                    drop(guard);
                    Ok((Some(queues.result(py, settled)?), packets, total, 0))
                }
            }
        })
    }

    /// `(events, packets, bytes, max_batch)` of the reads the thread pushed itself since the last call
    /// (bytes with virtio headers; the handed-back reads are the loop's to count).
    fn take_stats(&self, py: Python<'_>) -> (u64, u64, u64, u64) {
        let st = std::mem::take(&mut self.locked(py).stats);
        (st.events, st.packets, st.bytes, st.max_batch)
    }

    /// Whether the data plane's thread reads the device now.
    #[getter]
    fn on_data_plane(&self) -> bool {
        self.token.is_some()
    }
}

/// A TUN descriptor and the largest read (header included) that `TunIo` and `TunFeed` accept.
fn check_descriptor(fd: RawFd, packet_size: usize) -> PyResult<()> {
    if fd < 0 {
        return Err(PyValueError::new_err(format!("bad descriptor {fd}")));
    }
    if !(VNET_HDR_LEN + 1..=MAX_FRAME_SIZE_LIMIT).contains(&packet_size) {
        return Err(PyValueError::new_err(format!(
            "packet_size must be {}..={MAX_FRAME_SIZE_LIMIT}, got {packet_size}",
            VNET_HDR_LEN + 1
        )));
    }
    Ok(())
}

fn u32_bytes(values: &[u32]) -> &[u8] {
    // SAFETY: u32 has no padding and any byte pattern is a valid u8; the slice covers the same memory.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), std::mem::size_of_val(values)) }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("TUN_FATAL_ERRNOS", PyTuple::new(m.py(), FATAL_ERRNOS)?)?;
    m.add_class::<TunIo>()?;
    m.add_class::<TunFeed>()?;
    Ok(())
}
