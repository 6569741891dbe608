//! The Python face of [`vpn_packet_core::receive`]: `ReceiveSession`, one accepted TLS connection of a
//! node's receiver, pumped once per socket readiness event. Conversions only.

use std::os::fd::RawFd;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use vpn_packet_core::connection::Connection;
use vpn_packet_core::framing::MAX_FRAME_SIZE_LIMIT;
use vpn_packet_core::inbound::{InboundCounts, PacketList};
use vpn_packet_core::receive::{Read, ReceiveSession as CoreSession, SocketError, NO_PEER};
use vpn_packet_core::tun::FdTun;

use crate::connection::{config_error, events_to_python, refusal, Failed, TlsSecurity};
use crate::errors::no_panic;
use crate::prefix::PrefixTable;

/// Where accepted packets go: the TUN itself, or a list for a library sink.
enum Target {
    Tun(FdTun),
    List(PacketList),
}

fn socket_error(err: SocketError) -> PyErr {
    let io = std::io::Error::from_raw_os_error(err.0);
    PyOSError::new_err((err.0, io.to_string()))
}

/// Counters reported per pump, in `pump`'s tuple after `events`, `read` and `unsent`.
fn deltas(frames: (u64, u64), now: &InboundCounts, before: &InboundCounts) -> Counts {
    (
        frames.0,
        frames.1,
        now.delivered - before.delivered,
        now.delivered_bytes - before.delivered_bytes,
        now.extra_segments - before.extra_segments,
        now.spoofed - before.spoofed,
        now.unparsable - before.unparsable,
        now.offload_invalid - before.offload_invalid,
        now.write_dropped - before.write_dropped,
        now.write_errors - before.write_errors,
    )
}

/// One accepted connection of a node's receiver on the native core: TLS, the signed hello, frames, the
/// source check, the TUN write (`tun_fd` given) or a list for a library sink (`tun_fd` None:
/// `take_packets`), and the ack, in one call per socket readiness event (`pump`). The socket and the TUN
/// stay owned by Python. `indexes` maps peer ids to their values in `table`: the session keeps the dict
/// (not a copy) and reads the proved peer's value once, at its first frame, so a session costs the same
/// with 10 peers known or 10,000.
#[pyclass(module = "vpn_packet._native", name = "ReceiveSession")]
pub struct ReceiveSession {
    inner: CoreSession,
    target: Target,
    sock: RawFd,
    table: Py<PrefixTable>,
    indexes: Py<PyDict>,
}

type Counts = (u64, u64, u64, u64, u64, u64, u64, u64, u64, u64);
type PumpResult<'py> = (Option<Bound<'py, PyList>>, i64, usize, Counts);

#[pymethods]
impl ReceiveSession {
    #[new]
    #[pyo3(signature = (security, sock, tun_fd, table, indexes, *, vnet_header = false, read_size = 262144, refuse = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        security: &TlsSecurity,
        sock: RawFd,
        tun_fd: Option<RawFd>,
        table: Py<PrefixTable>,
        indexes: Py<PyDict>,
        vnet_header: bool,
        read_size: usize,
        refuse: Option<&str>,
    ) -> PyResult<Self> {
        no_panic(|| {
            if sock < 0 {
                return Err(PyValueError::new_err(format!("bad socket descriptor {sock}")));
            }
            let target = match tun_fd {
                Some(fd) if fd < 0 => return Err(PyValueError::new_err(format!("bad descriptor {fd}"))),
                Some(fd) => Target::Tun(FdTun(fd)),
                None => Target::List(PacketList::default()),
            };
            let max_frame_size = security.inner.max_frame_size();
            if max_frame_size == 0 || max_frame_size > MAX_FRAME_SIZE_LIMIT {
                return Err(PyValueError::new_err("max_frame_size out of range"));
            }
            // A list for a sink holds plain packets: super-packets are segmented, never passed whole.
            let vnet = vnet_header && matches!(target, Target::Tun(_));
            let conn = Connection::server(&security.inner, refusal(refuse)?).map_err(config_error)?;
            Ok(ReceiveSession {
                inner: CoreSession::new(conn, max_frame_size, vnet, read_size),
                target,
                sock,
                table,
                indexes,
            })
        })
    }

    /// One socket readiness event: one read, through TLS, the handshake and the frames; accepted packets
    /// written to the TUN (or collected for `take_packets`); then (with a TUN, when `flush`) the output, the
    /// ack among it, written to the socket (`flush=False`: the caller writes it later with `flush`, so that
    /// the reply a delivered packet provokes can leave before its ack). The GIL is released throughout. Returns `(events, read, unsent, counts)`:
    /// `events` None or the lifecycle events, `read` the bytes read (0: none ready, -1: end of stream; -2 - n: the sender reset the
    /// connection, `n` bytes were queued unread and are discarded),
    /// `unsent` output bytes the socket did not take, `counts` what this call added: `(frames,
    /// payload_bytes, delivered, delivered_bytes, extra_segments, spoofed, unparsable, offload_invalid,
    /// tun_dropped, tun_refused)`. Raises `OSError` for a failed socket call.
    #[pyo3(signature = (flush = true))]
    fn pump<'py>(&mut self, py: Python<'py>, flush: bool) -> PyResult<PumpResult<'py>> {
        no_panic(|| {
            let table = self.table.bind(py).borrow();
            let routes = &table.inner;
            let indexes = &self.indexes;
            // Called once per connection (the core keeps the value until `set_route`), with the GIL
            // released around the pump: taken again for this one look-up.
            let index_of = |peer: &str| {
                Python::attach(|py| {
                    indexes
                        .bind(py)
                        .get_item(peer)
                        .ok()
                        .flatten()
                        .and_then(|value| value.extract::<u32>().ok())
                        .unwrap_or(NO_PEER)
                })
            };
            let (inner, target, sock) = (&mut self.inner, &mut self.target, self.sock);
            let before_counts = *inner.counts();
            let before = inner.connection().counts();
            let result = py.detach(|| match target {
                Target::Tun(tun) => inner.pump(sock, routes, index_of, tun, flush),
                Target::List(list) => inner.pump(sock, routes, index_of, list, false),
            });
            let (read, events) = result.map_err(socket_error)?;
            let after = inner.connection().counts();
            let read = match read {
                Read::Data(n) => n as i64,
                Read::Eof => -1,
                Read::WouldBlock => 0,
                // -2 - unread: the sender reset the connection with `unread` bytes queued (discarded).
                Read::Reset { unread } => -2 - unread as i64,
            };
            let events = if events.is_empty() {
                None
            } else {
                Some(events_to_python(py, events)?)
            };
            let counts = deltas(
                (
                    after.frames - before.frames,
                    after.frame_bytes - before.frame_bytes,
                ),
                inner.counts(),
                &before_counts,
            );
            Ok((events, read, inner.unsent(), counts))
        })
    }

    /// Writes what output the socket takes (the library path calls it once the sink has the packets, so
    /// the ack follows the delivery); returns the bytes still waiting. Raises `OSError` for a failed send.
    fn flush(&mut self, py: Python<'_>) -> PyResult<usize> {
        no_panic(|| {
            let (inner, sock) = (&mut self.inner, self.sock);
            py.detach(|| inner.flush(sock)).map_err(socket_error)
        })
    }

    /// The packets collected since the last call (the library path), in order.
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

    /// The routing table or the peers' values in it changed (a reload).
    fn set_route(&mut self, table: Py<PrefixTable>, indexes: Py<PyDict>) {
        self.table = table;
        self.indexes = indexes;
        self.inner.reroute();
    }

    /// Ends the connection from this side (close_notify into the output; `flush` writes it).
    fn close(&mut self) {
        self.inner.connection_mut().close();
    }

    /// Whether the connection runs TLS (False: an insecure node's plaintext).
    #[getter]
    fn encrypted(&self) -> bool {
        self.inner.connection().encrypted()
    }

    /// `"tls"`, `"challenge"`, `"answer"`, `"established"` or `"closed"`.
    #[getter]
    fn stage(&self) -> &'static str {
        self.inner.connection().stage().name()
    }

    /// The proved peer, once established.
    #[getter]
    fn peer_id(&self) -> Option<&str> {
        self.inner.connection().peer_id()
    }

    /// The failure that ended the connection, if one did.
    #[getter]
    fn failure(&self) -> Option<Failed> {
        self.inner.connection().failure().map(crate::connection::failed)
    }

    /// Frames taken so far (what the acks count).
    #[getter]
    fn frames(&self) -> u64 {
        self.inner.connection().counts().frames
    }

    /// Frames acknowledged so far: the count of the last ack queued (it has left once `unsent` is 0).
    #[getter]
    fn acked(&self) -> u64 {
        self.inner.connection().counts().acked
    }

    /// The errno of a TUN write that found the device gone (0: none).
    #[getter]
    fn fatal_errno(&self) -> i32 {
        self.inner.counts().fatal_errno
    }

    /// Output bytes not written yet.
    #[getter]
    fn unsent(&self) -> usize {
        self.inner.unsent()
    }

    /// Bytes held of collected packets not taken yet, and of a partial frame or handshake message.
    #[getter]
    fn buffered(&self) -> usize {
        let held = match &self.target {
            Target::Tun(_) => 0,
            Target::List(list) => list.data.len(),
        };
        self.inner.connection().buffered() + held
    }

    /// The TLS key exchange group negotiated, once known.
    #[getter]
    fn key_exchange_group(&self) -> Option<String> {
        self.inner.connection().key_exchange_group()
    }

    fn __repr__(&self) -> String {
        format!("<ReceiveSession {} frames={}>", self.stage(), self.frames())
    }
}

/// Registers `ReceiveSession`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ReceiveSession>()?;
    Ok(())
}
