//! TUN device I/O for the node's data path, with the GIL released.
//!
//! - `TunIo.read_batch`: every packet ready on the non-blocking descriptor (until `EAGAIN` or a bound), read
//!   into one reused buffer and returned as one `bytes` plus one `bytes` of native-endian u32 lengths: two
//!   Python objects per readiness event, none per packet (`Dispatcher.dispatch_buffer` takes them as is).
//! - `TunIo.write_packets`: a batch of packets, one `write` (or `writev` with a virtio header) each.
//! - `InboundDecoder.feed`: the receive path of one connection ([`vpn_packet_core::inbound`]): socket bytes
//!   in, frames decoded, sources checked, accepted packets written to the TUN, all in one call.
//!
//! Why Rust: a `read()` or `write()` from Python costs about a microsecond of interpreter work per packet, and
//! profiles of the node showed those calls taking most of its time. Here a readiness event costs one call.

use std::os::fd::RawFd;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use vpn_packet_core::framing::{MAX_FRAME_SIZE_LIMIT, VNET_HDR_LEN};
use vpn_packet_core::inbound::{Inbound, TunWrite, WriteOutcome, PLAIN_VNET_HDR};

use crate::buffer::{with_bytes, PacketBytes};
use crate::errors::no_panic;
use crate::functions::for_each_item;
use crate::prefix::PrefixTable;

/// The errno of the last failed system call.
fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Errors after which the descriptor cannot work again (the device was deleted or closed); the one list,
/// exported as `TUN_FATAL_ERRNOS` for the reads `TunDevice` judges.
const FATAL_ERRNOS: [i32; 6] = [
    libc::EBADF,
    libc::EBADFD,
    libc::EIO,
    libc::ENXIO,
    libc::ENODEV,
    libc::EFAULT,
];

fn is_fatal(errno: i32) -> bool {
    FATAL_ERRNOS.contains(&errno)
}

/// One packet to a TUN descriptor, with its virtio header in the same `writev` when given.
fn write_fd(fd: RawFd, header: Option<&[u8]>, packet: &[u8]) -> WriteOutcome {
    loop {
        let n = match header {
            None => {
                // SAFETY: `packet` is a valid slice for the duration of the call.
                unsafe { libc::write(fd, packet.as_ptr().cast(), packet.len()) }
            }
            Some(header) => {
                let iov = [
                    libc::iovec {
                        iov_base: header.as_ptr() as *mut libc::c_void,
                        iov_len: header.len(),
                    },
                    libc::iovec {
                        iov_base: packet.as_ptr() as *mut libc::c_void,
                        iov_len: packet.len(),
                    },
                ];
                // SAFETY: both iovecs point into live slices; writev only reads them.
                unsafe { libc::writev(fd, iov.as_ptr(), 2) }
            }
        };
        if n >= 0 {
            return WriteOutcome::Written;
        }
        match errno() {
            libc::EINTR => continue,
            libc::EAGAIN | libc::ENOBUFS | libc::ENOMEM => return WriteOutcome::Dropped,
            e if is_fatal(e) => return WriteOutcome::Fatal(e),
            _ => return WriteOutcome::Refused,
        }
    }
}

struct FdWriter(RawFd);

impl TunWrite for FdWriter {
    fn write_packet(&mut self, vnet_header: Option<&[u8]>, packet: &[u8]) -> WriteOutcome {
        write_fd(self.0, vnet_header, packet)
    }
}

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
            let capacity = max_bytes.max(1) + size;
            if self.buffer.len() < capacity {
                self.buffer.resize(capacity, 0);
            }
            let (buffer, lengths) = (&mut self.buffer, &mut self.lengths);
            lengths.clear();
            let (total, error) = py.detach(|| {
                let mut total = 0usize;
                let mut error = 0i32;
                while lengths.len() < max_packets.max(1) && total < max_bytes.max(1) {
                    // SAFETY: `total + size <= capacity == buffer.len()`, so the read stays in the buffer.
                    let n = unsafe { libc::read(fd, buffer.as_mut_ptr().add(total).cast(), size) };
                    if n > 0 {
                        lengths.push(n as u32);
                        total += n as usize;
                        continue;
                    }
                    if n == 0 {
                        break;
                    }
                    match errno() {
                        libc::EINTR => continue,
                        libc::EAGAIN => break,
                        e => {
                            error = e;
                            break;
                        }
                    }
                }
                (total, error)
            });
            let data = PyBytes::new(py, &self.buffer[..total]);
            let lengths = PyBytes::new(py, u32_bytes(&self.lengths));
            Ok((data, lengths, error))
        })
    }

    /// Writes `packets` in order (plain IP packets; an all-zero virtio header is added when
    /// `vnet_header`) until the device has no room: `(written, bytes, refused, stopped_at, fatal_errno)`,
    /// `stopped_at` being the index of the first packet not written for want of room (`EAGAIN`), or -1.
    /// The GIL is released meanwhile.
    fn write_packets(
        &self,
        py: Python<'_>,
        packets: &Bound<'_, PyAny>,
    ) -> PyResult<(u64, u64, u64, i64, i32)> {
        no_panic(|| {
            let mut held: Vec<PacketBytes<'_>> = Vec::new();
            for_each_item(packets, |item| {
                held.push(PacketBytes::get(item)?);
                Ok(())
            })?;
            let slices: Vec<&[u8]> = held.iter().map(PacketBytes::as_slice).collect();
            let (fd, vnet) = (self.fd, self.vnet_header);
            Ok(py.detach(|| {
                let (mut written, mut bytes, mut refused) = (0u64, 0u64, 0u64);
                let header = vnet.then_some(&PLAIN_VNET_HDR[..]);
                for (index, packet) in slices.iter().enumerate() {
                    match write_fd(fd, header, packet) {
                        WriteOutcome::Written => {
                            written += 1;
                            bytes += packet.len() as u64;
                        }
                        WriteOutcome::Dropped => return (written, bytes, refused, index as i64, 0),
                        WriteOutcome::Refused => refused += 1,
                        WriteOutcome::Fatal(e) => return (written, bytes, refused, index as i64, e),
                    }
                }
                (written, bytes, refused, -1, 0)
            }))
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

/// The receive path of one authenticated connection: bytes from the socket in, accepted packets out to the
/// TUN (see the module documentation). The peer's prefixes are `table`'s entries of value `peer`.
#[pyclass(module = "vpn_packet._native", name = "InboundDecoder")]
pub struct InboundDecoder {
    inner: Inbound,
    fd: RawFd,
    table: Py<PrefixTable>,
    peer: u32,
}

#[pymethods]
impl InboundDecoder {
    #[new]
    #[pyo3(signature = (fd, table, peer, *, max_frame_size = 65535, vnet_header = false))]
    fn new(
        fd: RawFd,
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
        Ok(InboundDecoder {
            inner: Inbound::new(max_frame_size, vnet_header),
            fd,
            table,
            peer,
        })
    }

    /// The routing table and this peer's value in it changed (a reload).
    fn set_route(&mut self, table: Py<PrefixTable>, peer: u32) {
        self.table = table;
        self.peer = peer;
    }

    /// Decodes `data` and writes the accepted packets to the TUN, with the GIL released. Returns what this
    /// call added: `(frames, payload_bytes, delivered, delivered_bytes, spoofed, unparsable, lost, error)`,
    /// `lost` being
    /// packets the TUN did not take (no room, refused, device gone) or offload frames that could not be
    /// honoured, `error` the reason of a framing error (None: none). Frames before an error are processed
    /// and counted; the decoder is failed from then on (the stream must be closed).
    #[allow(clippy::type_complexity)]
    fn feed(
        &mut self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<(u64, u64, u64, u64, u64, u64, u64, Option<&'static str>)> {
        no_panic(|| {
            let table = self.table.bind(py).borrow();
            let (inner, fd, peer) = (&mut self.inner, self.fd, self.peer);
            let before = (
                inner.decoder().frames(),
                inner.decoder().payload_bytes(),
                inner.counts,
            );
            let routes = &table.inner;
            let result = with_bytes(data, |bytes| {
                py.detach(|| inner.feed(bytes, routes, peer, &mut FdWriter(fd)))
            })?;
            let error = result.err().map(|err| err.reason());
            let (frames, payload, c) = before;
            let now = inner.counts;
            let lost = |c: &vpn_packet_core::inbound::InboundCounts| {
                c.write_dropped + c.write_errors + c.offload_invalid
            };
            Ok((
                inner.decoder().frames() - frames,
                inner.decoder().payload_bytes() - payload,
                now.delivered - c.delivered,
                now.delivered_bytes - c.delivered_bytes,
                now.spoofed - c.spoofed,
                now.unparsable - c.unparsable,
                lost(&now) - lost(&c),
                error,
            ))
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

    /// Bytes held of an unfinished frame.
    #[getter]
    fn buffered(&self) -> usize {
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
