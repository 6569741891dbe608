//! The Python face of the TUN descriptor's I/O and of the receive path: conversions only. The system calls
//! and their rules live in the core ([`vpn_packet_core::tun`]), the receive path in
//! [`vpn_packet_core::inbound`]; here `bytes` and lists become slices and counts become tuples.
//!
//! - `TunIo.read_into`: every packet ready on the non-blocking descriptor (until `EAGAIN` or a bound), read
//!   into one reused buffer and routed straight into a dispatcher's `DestinationQueues` (whose fast path
//!   writes an established destination's packets into its connection in the same call): no Python object
//!   and no copy of the packets per readiness event (issue 20, item 3).
//! - `TunIo.read_batch`: the same read, returned as one `bytes` plus one `bytes` of native-endian u32
//!   lengths (for a reader that wants the packets: tests, `Dispatcher.dispatch_buffer`).
//! - `TunIo.write_packets`: a batch of packets, one `write` (or `writev` with a virtio header) each.
//! - `InboundDecoder.feed`: the receive path of one connection: socket bytes in, frames decoded, sources
//!   checked, accepted packets written to the TUN (or collected for a library sink), all in one call.
//!
//! Why Rust: a `read()` or `write()` from Python costs about a microsecond of interpreter work per packet, and
//! profiles of the node showed those calls taking most of its time. Here a readiness event costs one call.

use std::os::fd::RawFd;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};
use vpn_packet_core::framing::{MAX_FRAME_SIZE_LIMIT, VNET_HDR_LEN};
use vpn_packet_core::inbound::{Inbound, InboundCounts, PacketList, PLAIN_VNET_HDR};
use vpn_packet_core::tun::{self, FdTun, FATAL_ERRNOS};

use crate::buffer::{with_bytes, PacketBytes};
use crate::errors::no_panic;
use crate::functions::for_each_item;
use crate::prefix::PrefixTable;
use crate::queues::{DestinationQueues, PushResult};

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
        if fd < 0 {
            return Err(PyValueError::new_err(format!("bad descriptor {fd}")));
        }
        if !(VNET_HDR_LEN + 1..=MAX_FRAME_SIZE_LIMIT).contains(&packet_size) {
            return Err(PyValueError::new_err(format!(
                "packet_size must be {}..={MAX_FRAME_SIZE_LIMIT}, got {packet_size}",
                VNET_HDR_LEN + 1
            )));
        }
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

fn u32_bytes(values: &[u32]) -> &[u8] {
    // SAFETY: u32 has no padding and any byte pattern is a valid u8; the slice covers the same memory.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), std::mem::size_of_val(values)) }
}

/// Where one connection's accepted packets go: the TUN itself, or a list for a library sink.
enum Target {
    Tun(FdTun),
    List(PacketList),
}

/// The receive path of one authenticated connection: bytes from the socket in, accepted packets out to the
/// TUN (`fd` given) or collected for a library sink (`fd` None: `take_packets`); see the module
/// documentation. The peer's prefixes are `table`'s entries of value `peer`.
#[pyclass(module = "vpn_packet._native", name = "InboundDecoder")]
pub struct InboundDecoder {
    inner: Inbound,
    target: Target,
    table: Py<PrefixTable>,
    peer: u32,
}

/// The counters `feed` reports, in its tuple's order after `frames` and `payload_bytes`.
fn deltas(now: &InboundCounts, before: &InboundCounts) -> [u64; 8] {
    [
        now.delivered - before.delivered,
        now.delivered_bytes - before.delivered_bytes,
        now.extra_segments - before.extra_segments,
        now.spoofed - before.spoofed,
        now.unparsable - before.unparsable,
        now.offload_invalid - before.offload_invalid,
        now.write_dropped - before.write_dropped,
        now.write_errors - before.write_errors,
    ]
}

#[pymethods]
impl InboundDecoder {
    #[new]
    #[pyo3(signature = (fd, table, peer, *, max_frame_size = 65535, vnet_header = false))]
    fn new(
        fd: Option<RawFd>,
        table: Py<PrefixTable>,
        peer: u32,
        max_frame_size: usize,
        vnet_header: bool,
    ) -> PyResult<Self> {
        if max_frame_size == 0 || max_frame_size > MAX_FRAME_SIZE_LIMIT {
            return Err(PyValueError::new_err(format!(
                "max_frame_size must be 1..={MAX_FRAME_SIZE_LIMIT}, got {max_frame_size}"
            )));
        }
        let target = match fd {
            Some(fd) if fd < 0 => return Err(PyValueError::new_err(format!("bad descriptor {fd}"))),
            Some(fd) => Target::Tun(FdTun(fd)),
            None => Target::List(PacketList::default()),
        };
        // A list for a sink holds plain packets: super-packets are segmented, never passed whole.
        let vnet = vnet_header && matches!(target, Target::Tun(_));
        Ok(InboundDecoder {
            inner: Inbound::new(max_frame_size, vnet),
            target,
            table,
            peer,
        })
    }

    /// The routing table and this peer's value in it changed (a reload).
    fn set_route(&mut self, table: Py<PrefixTable>, peer: u32) {
        self.table = table;
        self.peer = peer;
    }

    /// Decodes `data`, checks every packet's source and writes the accepted ones to the TUN (or collects
    /// them for `take_packets`), with the GIL released. Returns what this call added: `(frames,
    /// payload_bytes, delivered, delivered_bytes, extra_segments, spoofed, unparsable, offload_invalid,
    /// tun_dropped, tun_refused, error)`: `delivered` the packets the TUN took (or that were collected),
    /// `extra_segments` packets beyond the first that segmenting super-packets made, `offload_invalid`
    /// offload frames whose header could not be honoured, `tun_dropped` packets the TUN had no room for
    /// (or that came after it was gone), `tun_refused` packets the kernel refused, `error` the reason of a
    /// framing error (None: none). So `frames + extra_segments` = `delivered` + every drop. Frames before an
    /// error are processed and counted; the decoder is failed from then on (the stream must be closed).
    #[allow(clippy::type_complexity)]
    fn feed(
        &mut self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<(
        u64,
        u64,
        u64,
        u64,
        u64,
        u64,
        u64,
        u64,
        u64,
        u64,
        Option<&'static str>,
    )> {
        no_panic(|| {
            let table = self.table.bind(py).borrow();
            let (inner, target, peer) = (&mut self.inner, &mut self.target, self.peer);
            let before = (
                inner.decoder().frames(),
                inner.decoder().payload_bytes(),
                inner.counts,
            );
            let routes = &table.inner;
            let result = with_bytes(data, |bytes| {
                py.detach(|| match target {
                    Target::Tun(tun) => inner.feed(bytes, routes, peer, tun),
                    Target::List(list) => inner.feed(bytes, routes, peer, list),
                })
            })?;
            let error = result.err().map(|err| err.reason());
            let [delivered, delivered_bytes, extra, spoofed, unparsable, invalid, dropped, refused] =
                deltas(&inner.counts, &before.2);
            Ok((
                inner.decoder().frames() - before.0,
                inner.decoder().payload_bytes() - before.1,
                delivered,
                delivered_bytes,
                extra,
                spoofed,
                unparsable,
                invalid,
                dropped,
                refused,
                error,
            ))
        })
    }

    /// The packets collected since the last call (no `fd`: the library sink's path), in order; empty for a
    /// decoder that writes to a TUN.
    fn take_packets<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        no_panic(|| {
            let Target::List(list) = &mut self.target else {
                return Ok(PyList::empty(py));
            };
            let packets = PyList::new(py, list.iter().map(|packet| PyBytes::new(py, packet)))?;
            list.clear();
            Ok(packets)
        })
    }

    /// The errno of a TUN write that found the device gone (0: none).
    #[getter]
    fn fatal_errno(&self) -> i32 {
        self.inner.counts.fatal_errno
    }

    /// Frames decoded so far (what acknowledgements count).
    #[getter]
    fn frames(&self) -> u64 {
        self.inner.decoder().frames()
    }

    /// Payload bytes of those frames.
    #[getter]
    fn payload_bytes(&self) -> u64 {
        self.inner.decoder().payload_bytes()
    }

    /// Bytes held of an unfinished frame, and of collected packets not taken yet.
    #[getter]
    fn buffered(&self) -> usize {
        let held = match &self.target {
            Target::Tun(_) => 0,
            Target::List(list) => list.data.len(),
        };
        self.inner.decoder().buffered() + held
    }

    /// Bytes held of an unfinished frame (a stream may end cleanly only when this is 0).
    #[getter]
    fn partial(&self) -> usize {
        self.inner.decoder().buffered()
    }

    /// The reason of the error that failed the decoder, or None.
    #[getter]
    fn error(&self) -> Option<&'static str> {
        self.inner.decoder().error().map(|e| e.reason())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("TUN_FATAL_ERRNOS", PyTuple::new(m.py(), FATAL_ERRNOS)?)?;
    m.add_class::<TunIo>()?;
    m.add_class::<InboundDecoder>()?;
    Ok(())
}
