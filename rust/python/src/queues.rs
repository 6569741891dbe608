//! `DestinationQueues` for Python: the dispatcher's per-destination queues of framed packets.
//!
//! The logic is `vpn_packet_core::queues`; this file converts buffers and keys. Packets come in as any
//! C-contiguous byte buffer (read without copying); keys go out as `str` objects kept per queue, so a
//! batch push allocates nothing per ready key (the dispatcher's dict lookups also get a `str` whose hash is
//! computed already). The GIL stays held: a push is pure CPU work of a few microseconds.

use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};
use vpn_packet_core::framing::DEFAULT_MAX_FRAME_SIZE;
use vpn_packet_core::ledger::{FastCounters as CoreFastCounters, FastOwner};
use vpn_packet_core::queues::{
    frames, payload_bytes, without_frames, DestinationQueues as CoreQueues, KeyedPush, MalformedFrames,
    Pushed, QueueId, OFFLOAD_FLAG, VNET_HDR_LEN,
};

use crate::buffer::{with_bytes, PacketBytes};
use crate::errors::{no_panic, split_error};
use crate::functions::for_each_item;
use crate::key_cache::key_and_ip;
use crate::send::{SendSession, SharedSession};

// Signature defaults are literals (stubtest reads them); keep them equal to the core default.
const _: () = assert!(DEFAULT_MAX_FRAME_SIZE == 65535);

/// `push_keyed` results (module constants `PUSH_*`).
const PUSH_QUEUED: u8 = 0;
const PUSH_READY: u8 = 1;
const PUSH_PRESSURE: u8 = 2;
const PUSH_FULL: u8 = 3;
const PUSH_UNKNOWN: u8 = 4;
const PUSH_INVALID: u8 = 5;

pub(crate) type PushResult<'py> = (usize, Bound<'py, PyList>, Option<Bound<'py, PyList>>, bool);

fn malformed(err: MalformedFrames) -> PyErr {
    PyValueError::new_err(err.to_string())
}

/// Native-endian u32 lengths from an `array('I')`, a `memoryview` of format `I`, `bytes`/`bytearray`
/// holding them, or a sequence of ints.
fn lengths_of(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    if let Ok(buffer) = PyBuffer::<u32>::get(obj) {
        return buffer.to_vec(obj.py());
    }
    if let Ok(held) = PacketBytes::get(obj) {
        let bytes = held.as_slice();
        if bytes.len() % 4 != 0 {
            return Err(PyValueError::new_err(format!(
                "lengths: {} bytes is not a whole number of u32 lengths",
                bytes.len()
            )));
        }
        return Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect());
    }
    obj.extract::<Vec<u32>>().map_err(|_| {
        PyTypeError::new_err(
            "lengths must be a buffer of native-endian u32 (array('I'), bytes) or a list of ints",
        )
    })
}

/// Packets a destination (or a whole dispatcher) sent on the fast path, by fate (see
/// `vpn_packet_core::ledger`): written and unacknowledged (`in_flight`), acknowledged (`sent`, with their
/// payload `sent_bytes`), or lost with their connection (`lost`). Moved by the sessions, read by Python.
#[pyclass(module = "vpn_packet._native", name = "FastCounters", frozen)]
pub struct FastCounters {
    inner: Arc<CoreFastCounters>,
}

#[pymethods]
impl FastCounters {
    #[new]
    fn new() -> Self {
        FastCounters {
            inner: Arc::default(),
        }
    }

    /// `(in_flight, sent, sent_bytes, lost)`, read together.
    fn counts(&self) -> (u64, u64, u64, u64) {
        let c = self.inner.counts();
        (c.in_flight, c.sent, c.sent_bytes, c.lost)
    }

    #[getter]
    fn in_flight(&self) -> u64 {
        self.inner.counts().in_flight
    }

    fn __repr__(&self) -> String {
        let c = self.inner.counts();
        format!(
            "FastCounters(in_flight={}, sent={}, sent_bytes={}, lost={})",
            c.in_flight, c.sent, c.sent_bytes, c.lost
        )
    }
}

/// Where a destination's packets may go without its worker: the established session its worker writes
/// to (see `DestinationQueues.set_fast`).
struct FastRoute {
    session: Arc<Mutex<SharedSession>>,
    owner: FastOwner,
    window: u64,
    /// Called with the bytes the socket did not take after a fast write (the link then watches for
    /// writability): the one Python call of the fast path, only when the socket pushes back, always made on
    /// the loop (shared, so the data plane's thread can hand it over without the GIL).
    on_blocked: Arc<Py<PyAny>>,
}

/// The `on_blocked` calls a push owes: `(callback, unsent)`.
pub(crate) type Blocked = Vec<(Arc<Py<PyAny>>, usize)>;

/// The queues and their fast routes, shared by the Python object and the data plane's thread (which
/// pushes a TUN read of established destinations without the GIL: `push_off_loop`).
pub(crate) struct QueuesCore {
    inner: CoreQueues,
    /// The fast route of each queue that has one, by queue id.
    fast: Vec<Option<FastRoute>>,
    /// Packets accepted by pushes of the data plane's thread that left nothing for the loop, which the
    /// dispatcher never sees: its `accepted` adds them.
    accepted_off_loop: u64,
}

pub(crate) type SharedQueues = Arc<Mutex<QueuesCore>>;

/// A push's outcome before it is made Python objects: the packets accepted, the queues left ready (for
/// their workers), the provisional queues made, pressure, and the `on_blocked` calls owed.
pub(crate) struct Settled {
    pub accepted: usize,
    ready: Vec<QueueId>,
    new: Vec<QueueId>,
    pressure: bool,
    pub blocked: Blocked,
}

impl Settled {
    /// Whether the loop has anything to do for it besides the `on_blocked` calls.
    pub fn leaves_work(&self) -> bool {
        !self.ready.is_empty() || !self.new.is_empty() || self.pressure
    }
}

fn lock_core(core: &Mutex<QueuesCore>) -> MutexGuard<'_, QueuesCore> {
    core.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl QueuesCore {
    fn has_fast(&self, id: QueueId) -> bool {
        matches!(self.fast.get(id), Some(Some(_)))
    }

    fn clear_fast_of(&mut self, id: QueueId) -> Option<FastRoute> {
        self.fast.get_mut(id).and_then(Option::take)
    }

    /// The fast path: a queue that was empty before this push and has a fast route is written to its
    /// session now, whole, in this call, and is not reported ready (no worker wakes up). When the session
    /// cannot take it (not established, output waiting, window full, in use elsewhere), the packets stay
    /// queued, the route is withdrawn (later packets queue behind them, in order) and the worker is woken
    /// as usual. Returns whether the queue was written; a socket that did not take everything adds the
    /// route's `on_blocked` call to `blocked`.
    fn try_fast(&mut self, id: QueueId, blocked: &mut Blocked) -> bool {
        let Some(Some(route)) = self.fast.get(id) else {
            return false;
        };
        let (wire, count) = (self.inner.peek(id), self.inner.depth(id) as u64);
        let written = match route.session.try_lock() {
            Ok(mut shared) => {
                let sock = shared.sock;
                shared
                    .session
                    .send_fast(sock, wire, count, route.window, route.owner.clone())
            }
            // In use (a call of the loop that let the GIL go, or the other thread): the worker's way this
            // time, the route kept.
            Err(_) => return false,
        };
        match written {
            Ok(unsent) => {
                if unsent > 0 {
                    blocked.push((Arc::clone(&route.on_blocked), unsent));
                }
                // The session has the packets: the queue lets them go.
                self.inner.sent_directly(id);
                true
            }
            Err(_) => {
                // Withdrawn; dropped here even off the loop: its callback is shared (`Arc`), and the last
                // holder may well be the loop's.
                drop(self.clear_fast_of(id));
                false
            }
        }
    }

    fn settle(&mut self, pushed: Pushed) -> Settled {
        let mut blocked = Vec::new();
        let ready = pushed
            .ready
            .into_iter()
            .filter(|&id| !self.try_fast(id, &mut blocked))
            .collect();
        Settled {
            accepted: pushed.accepted,
            ready,
            new: pushed.new,
            pressure: pushed.pressure,
            blocked,
        }
    }
}

/// The data plane's push of a TUN read, without the GIL: made only when every packet goes to a
/// destination with a fast route and an empty queue (`CoreQueues::all_fast`); None (nothing pushed)
/// otherwise, and the read is the loop's to push. What it accepted is counted here
/// (`accepted_off_loop`) unless it leaves work for the loop (which then admits it).
pub(crate) fn push_off_loop(
    core: &Mutex<QueuesCore>,
    buffer: &[u8],
    lengths: &[u32],
    vnet_header: bool,
) -> Option<Settled> {
    let mut core = lock_core(core);
    let c = &mut *core;
    if !c.inner.all_fast(buffer, lengths, vnet_header, |id| {
        matches!(c.fast.get(id), Some(Some(_)))
    }) {
        return None;
    }
    let pushed = c.inner.push_buffer(buffer, lengths, vnet_header).ok()?;
    let settled = c.settle(pushed);
    if !settled.leaves_work() {
        c.accepted_off_loop += settled.accepted as u64;
    }
    Some(settled)
}

/// Makes the owed `on_blocked(unsent)` calls, on the loop; a failure is reported, not raised (the push's
/// packets are taken and counted either way).
pub(crate) fn call_blocked(py: Python<'_>, blocked: Blocked) {
    for (callback, unsent) in blocked {
        if let Err(err) = callback.call1(py, (unsent,)) {
            err.write_unraisable(py, None);
        }
    }
}

/// Per-destination bounded queues of framed packets (see `vpn_packet_core::queues`).
///
/// A batch push returns `(accepted, ready, new, pressure)`: packets queued on existing queues, the keys of
/// existing queues that were empty before, and `new` (None when empty): `(key, dest_ip, queued, overflow)`
/// of each provisional queue made for a key without one. The caller adopts each (`add`) or removes it
/// (`remove`, which returns the packets to count as rejected) before anything else touches the queues.
#[pyclass(module = "vpn_packet._native", name = "DestinationQueues")]
pub struct DestinationQueues {
    pub(crate) core: SharedQueues,
    /// The key `str` of each queue, by queue id.
    names: Vec<Option<Py<PyString>>>,
    /// Every destination's fast-path counters together.
    fast_total: Arc<CoreFastCounters>,
}

impl DestinationQueues {
    fn core(&self) -> MutexGuard<'_, QueuesCore> {
        lock_core(&self.core)
    }

    fn set_name(&mut self, id: QueueId, name: Py<PyString>) {
        if self.names.len() <= id {
            self.names.resize_with(id + 1, || None);
        }
        self.names[id] = Some(name);
    }

    fn id(&self, key: &Bound<'_, PyString>) -> PyResult<Option<QueueId>> {
        Ok(self.core().inner.id(key.to_str()?))
    }

    /// A TUN read's packets (end to end in `buffer`, `lengths` each), routed as `push_buffer` does.
    pub(crate) fn push_read<'py>(
        &mut self,
        py: Python<'py>,
        buffer: &[u8],
        lengths: &[u32],
        vnet_header: bool,
    ) -> PyResult<PushResult<'py>> {
        let settled = {
            let mut core = self.core();
            let pushed = core
                .inner
                .push_buffer(buffer, lengths, vnet_header)
                .map_err(|e| split_error(&e))?;
            core.settle(pushed)
        };
        self.result(py, settled)
    }

    /// A push's outcome as Python objects (the owed `on_blocked` calls made, after the queues' lock).
    pub(crate) fn result<'py>(&mut self, py: Python<'py>, settled: Settled) -> PyResult<PushResult<'py>> {
        let Settled {
            accepted,
            ready: ready_ids,
            new: new_ids,
            pressure,
            blocked,
        } = settled;
        let ready = PyList::empty(py);
        for id in ready_ids {
            if let Some(Some(name)) = self.names.get(id) {
                ready.append(name.bind(py))?;
            }
        }
        let new = if new_ids.is_empty() {
            None
        } else {
            let new = PyList::empty(py);
            for id in new_ids {
                let (dest, key, depth, overflow) = {
                    let core = self.core();
                    let q = &core.inner;
                    (
                        q.destination(id),
                        q.key(id).unwrap_or_default().to_owned(),
                        q.depth(id),
                        q.overflow(id),
                    )
                };
                let (key, ip) = match dest {
                    Some(dest) => key_and_ip(py, &dest),
                    None => (PyString::new(py, &key), PyString::new(py, "")),
                };
                self.set_name(id, key.clone().unbind());
                new.append((key, ip, depth, overflow))?;
            }
            Some(new)
        };
        call_blocked(py, blocked);
        Ok((accepted, ready, new, pressure))
    }
}

#[pymethods]
impl DestinationQueues {
    #[new]
    #[pyo3(signature = (capacity, max_packet_size = 65535))]
    fn new(capacity: usize, max_packet_size: usize) -> PyResult<Self> {
        if capacity == 0 {
            return Err(PyValueError::new_err("capacity must be at least 1"));
        }
        if max_packet_size == 0 || max_packet_size > DEFAULT_MAX_FRAME_SIZE {
            return Err(PyValueError::new_err(format!(
                "max_packet_size must be 1..={DEFAULT_MAX_FRAME_SIZE}, got {max_packet_size}"
            )));
        }
        Ok(DestinationQueues {
            core: Arc::new(Mutex::new(QueuesCore {
                inner: CoreQueues::new(capacity, max_packet_size),
                fast: Vec::new(),
                accepted_off_loop: 0,
            })),
            names: Vec::new(),
            fast_total: Arc::default(),
        })
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.core().inner.capacity()
    }

    #[getter]
    fn max_packet_size(&self) -> usize {
        self.core().inner.max_packet_len()
    }

    /// Offload frames queued so far.
    #[getter]
    fn offload_frames(&self) -> u64 {
        self.core().inner.offload_frames()
    }

    /// Rejections counted here, by reason: `invalid_packet`, `queue_full`.
    fn rejected<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = self.core().inner.rejected();
        let out = PyDict::new(py);
        out.set_item("invalid_packet", r.invalid_packet)?;
        out.set_item("queue_full", r.queue_full)?;
        Ok(out)
    }

    /// Routes a list (or other iterable) of raw IP packets to their destinations' queues.
    fn push<'py>(&mut self, py: Python<'py>, packets: &Bound<'py, PyAny>) -> PyResult<PushResult<'py>> {
        no_panic(|| {
            let mut held: Vec<PacketBytes<'py>> = Vec::new();
            for_each_item(packets, |item| {
                held.push(PacketBytes::get(item)?);
                Ok(())
            })?;
            let settled = {
                let mut core = self.core();
                let pushed = core
                    .inner
                    .push_packets(held.iter().map(PacketBytes::as_slice), false);
                core.settle(pushed)
            };
            self.result(py, settled)
        })
    }

    /// Routes packets laid end to end in `buffer` (a TUN read) with their `lengths` (native-endian u32).
    /// With `vnet_header`, each entry starts with a 10-byte `virtio_net_hdr`. Raises `ValueError`, queueing
    /// nothing, when the lengths need more bytes than the buffer holds.
    #[pyo3(signature = (buffer, lengths, *, vnet_header = false))]
    fn push_buffer<'py>(
        &mut self,
        py: Python<'py>,
        buffer: &Bound<'py, PyAny>,
        lengths: &Bound<'py, PyAny>,
        vnet_header: bool,
    ) -> PyResult<PushResult<'py>> {
        no_panic(|| {
            let lengths = lengths_of(lengths)?;
            let held = PacketBytes::get(buffer)?;
            self.push_read(py, held.as_slice(), &lengths, vnet_header)
        })
    }

    /// Queues one packet under `key` (any text); returns a `PUSH_*` constant. Empty packets and packets
    /// above `max_packet_size` are rejected (`PUSH_INVALID`, counted); a key without a queue is not
    /// (`PUSH_UNKNOWN`, not counted: `add` it, then push again).
    fn push_keyed(&mut self, key: &Bound<'_, PyString>, packet: &Bound<'_, PyAny>) -> PyResult<u8> {
        no_panic(|| {
            let key = key.to_str()?;
            let result = with_bytes(packet, |bytes| self.core().inner.push_keyed(key, bytes))?;
            Ok(match result {
                KeyedPush::Queued => PUSH_QUEUED,
                KeyedPush::Ready => PUSH_READY,
                KeyedPush::Pressure => PUSH_PRESSURE,
                KeyedPush::Full => PUSH_FULL,
                KeyedPush::Unknown => PUSH_UNKNOWN,
                KeyedPush::Invalid => PUSH_INVALID,
            })
        })
    }

    /// Creates the queue of `key` (or adopts its provisional queue, counting its overflow as `queue_full`);
    /// returns whether it was created or adopted (False: it existed already).
    fn add(&mut self, key: &Bound<'_, PyString>) -> PyResult<bool> {
        no_panic(|| {
            let (id, changed) = self.core().inner.add(key.to_str()?);
            if changed {
                self.set_name(id, key.clone().unbind());
            }
            Ok(changed)
        })
    }

    /// Removes the queue of `key` with its packets; returns how many it held (a provisional queue's
    /// overflow included). 0 if there is none.
    fn remove(&mut self, key: &Bound<'_, PyString>) -> PyResult<usize> {
        no_panic(|| {
            let mut core = lock_core(&self.core);
            if let Some(id) = core.inner.id(key.to_str()?) {
                if let Some(name) = self.names.get_mut(id) {
                    *name = None;
                }
                core.clear_fast_of(id);
            }
            Ok(core.inner.remove(key.to_str()?))
        })
    }

    /// Removes every queue.
    fn clear(&mut self) {
        let mut core = lock_core(&self.core);
        core.inner.clear();
        core.fast.clear();
        self.names.clear();
    }

    /// Lets `key`'s packets skip its worker while its queue is empty: a batch push (a TUN read) writes them
    /// to `session` (the established session its worker writes to) in the push itself, counted in
    /// `counters` (the destination's) and `fast_totals`, while the batch fits `window` bytes in flight.
    /// The worker must have nothing queued and nothing being written (order): it sets the route when it
    /// goes idle after a write on `session`, and `take` withdraws it. `on_blocked(unsent)` is called when
    /// the socket did not take everything. Returns False (nothing set) when `key` has no queue.
    fn set_fast(
        &mut self,
        key: &Bound<'_, PyString>,
        session: &SendSession,
        counters: &FastCounters,
        window: u64,
        on_blocked: Py<PyAny>,
    ) -> PyResult<bool> {
        let Some(id) = self.id(key)? else {
            return Ok(false);
        };
        let route = FastRoute {
            session: session.shared(),
            owner: FastOwner {
                destination: Arc::clone(&counters.inner),
                total: Arc::clone(&self.fast_total),
            },
            window,
            on_blocked: Arc::new(on_blocked),
        };
        let mut core = self.core();
        if core.fast.len() <= id {
            core.fast.resize_with(id + 1, || None);
        }
        core.fast[id] = Some(route);
        Ok(true)
    }

    /// Withdraws `key`'s fast route (its packets go through its worker again).
    fn clear_fast(&mut self, key: &Bound<'_, PyString>) -> PyResult<()> {
        if let Some(id) = self.id(key)? {
            let route = self.core().clear_fast_of(id);
            drop(route); // after the lock
        }
        Ok(())
    }

    /// Withdraws every fast route (routes changed, or the dispatcher is stopping).
    fn clear_all_fast(&mut self) {
        let routes = std::mem::take(&mut self.core().fast);
        drop(routes); // after the lock
    }

    /// Whether `key` has a fast route now.
    fn has_fast(&self, key: &Bound<'_, PyString>) -> PyResult<bool> {
        Ok(self.id(key)?.is_some_and(|id| self.core().has_fast(id)))
    }

    /// Packets accepted by the data plane's thread's pushes (the dispatcher's `accepted` adds them).
    #[getter]
    fn accepted_off_loop(&self) -> u64 {
        self.core().accepted_off_loop
    }

    /// Every destination's fast-path counters together.
    #[getter]
    fn fast_totals(&self) -> FastCounters {
        FastCounters {
            inner: Arc::clone(&self.fast_total),
        }
    }

    /// Empties the queue of `key`; returns how many packets it held.
    fn discard(&mut self, key: &Bound<'_, PyString>) -> PyResult<usize> {
        Ok(self.id(key)?.map_or(0, |id| self.core().inner.discard(id)))
    }

    /// Takes everything queued for `key`: `(framed, count)`. Those packets count against the bound (as in
    /// flight) until `set_in_flight(key, 0)`.
    fn take<'py>(
        &mut self,
        py: Python<'py>,
        key: &Bound<'py, PyString>,
    ) -> PyResult<(Bound<'py, PyBytes>, usize)> {
        no_panic(|| {
            let mut core = self.core();
            let (data, count) = match core.inner.id(key.to_str()?) {
                Some(id) => {
                    core.clear_fast_of(id); // the worker writes now: later packets queue behind
                    core.inner.take(id)
                }
                None => (Vec::new(), 0),
            };
            drop(core);
            Ok((PyBytes::new(py, &data), count))
        })
    }

    /// Sets how many packets of `key` are being written (the queue holds at most `capacity` minus that).
    fn set_in_flight(&mut self, key: &Bound<'_, PyString>, count: usize) -> PyResult<()> {
        let mut core = self.core();
        if let Some(id) = core.inner.id(key.to_str()?) {
            core.inner.set_in_flight(id, count);
        }
        Ok(())
    }

    /// Packets queued for `key` (0 without a queue).
    fn depth(&self, key: &Bound<'_, PyString>) -> PyResult<usize> {
        let core = self.core();
        Ok(core.inner.id(key.to_str()?).map_or(0, |id| core.inner.depth(id)))
    }

    /// Packets of `key` rejected as `queue_full`.
    fn dropped(&self, key: &Bound<'_, PyString>) -> PyResult<u64> {
        let core = self.core();
        Ok(core
            .inner
            .id(key.to_str()?)
            .map_or(0, |id| core.inner.dropped(id)))
    }

    /// The framed packets queued for `key`, without taking them (for inspection).
    fn peek<'py>(&self, py: Python<'py>, key: &Bound<'py, PyString>) -> PyResult<Bound<'py, PyBytes>> {
        let core = self.core();
        let id = core.inner.id(key.to_str()?);
        Ok(PyBytes::new(py, id.map_or(&[][..], |id| core.inner.peek(id))))
    }

    fn __len__(&self) -> usize {
        self.core().inner.len()
    }

    fn __contains__(&self, key: &Bound<'_, PyString>) -> PyResult<bool> {
        Ok(self.id(key)?.is_some())
    }

    fn __repr__(&self) -> String {
        let core = self.core();
        let q = &core.inner;
        let r = q.rejected();
        format!(
            "DestinationQueues(capacity={}, queues={}, invalid_packet={}, queue_full={}, offload_frames={})",
            q.capacity(),
            q.len(),
            r.invalid_packet,
            r.queue_full,
            q.offload_frames(),
        )
    }
}

/// The packets of a framed buffer (as `DestinationQueues.take` gives), in order. An offload frame gives its
/// packet without the `virtio_net_hdr`. Raises `ValueError` for a malformed buffer.
#[pyfunction]
pub fn split_framed<'py>(py: Python<'py>, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
    no_panic(|| {
        with_bytes(data, |bytes| {
            let out = PyList::empty(py);
            for frame in frames(bytes) {
                out.append(PyBytes::new(py, frame.map_err(malformed)?.packet))?;
            }
            Ok(out)
        })?
    })
}

/// Payload bytes of the first `count` frames of `data` (all when None): length prefixes not counted, the
/// virtio header of an offload frame counted (it travels with its packet).
#[pyfunction]
#[pyo3(signature = (data, count = None))]
pub fn framed_payload_bytes(data: &Bound<'_, PyAny>, count: Option<usize>) -> PyResult<usize> {
    no_panic(|| {
        with_bytes(data, |bytes| payload_bytes(bytes, count.unwrap_or(usize::MAX)))?.map_err(malformed)
    })
}

/// `data` without the frames at the given positions; returns `(framed, count)` of what is left.
#[pyfunction]
pub fn framed_without<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    positions: Vec<usize>,
) -> PyResult<(Bound<'py, PyBytes>, usize)> {
    no_panic(|| {
        let (kept, count) =
            with_bytes(data, |bytes| without_frames(bytes, &positions))?.map_err(malformed)?;
        Ok((PyBytes::new(py, &kept), count))
    })
}

/// Registers the class, the helper functions and the constants.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<DestinationQueues>()?;
    m.add_class::<FastCounters>()?;
    m.add_function(wrap_pyfunction!(split_framed, m)?)?;
    m.add_function(wrap_pyfunction!(framed_payload_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(framed_without, m)?)?;
    m.add("OFFLOAD_FLAG", OFFLOAD_FLAG)?;
    m.add("VNET_HDR_LEN", VNET_HDR_LEN)?;
    m.add("PUSH_QUEUED", PUSH_QUEUED)?;
    m.add("PUSH_READY", PUSH_READY)?;
    m.add("PUSH_PRESSURE", PUSH_PRESSURE)?;
    m.add("PUSH_FULL", PUSH_FULL)?;
    m.add("PUSH_UNKNOWN", PUSH_UNKNOWN)?;
    m.add("PUSH_INVALID", PUSH_INVALID)?;
    Ok(())
}
