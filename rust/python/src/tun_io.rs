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

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use vpn_packet_core::framing::{MAX_FRAME_SIZE_LIMIT, VNET_HDR_LEN};
use vpn_packet_core::inbound::PLAIN_VNET_HDR;
use vpn_packet_core::tun::{self, FATAL_ERRNOS};

use crate::buffer::PacketBytes;
use crate::errors::no_panic;
use crate::functions::for_each_item;
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

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("TUN_FATAL_ERRNOS", PyTuple::new(m.py(), FATAL_ERRNOS)?)?;
    m.add_class::<TunIo>()?;
    Ok(())
}
