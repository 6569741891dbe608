//! The Python face of [`vpn_packet_core::receive`]: `ReceiveSession`, one accepted TLS connection of a
//! node's receiver, pumped once per socket readiness event. Conversions only.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use vpn_packet_core::connection::{Connection, Event};
use vpn_packet_core::framing::MAX_FRAME_SIZE_LIMIT;
use vpn_packet_core::inbound::{PacketList, TunWrite, WriteOutcome};
use vpn_packet_core::receive::{
    Driven, Read, ReceiveSession as CoreSession, ReceiveTally, SocketError, NO_PEER,
};
use vpn_packet_core::tun::FdTun;

use crate::connection::{config_error, events_to_python, refusal, Failed, TlsSecurity};
use crate::errors::no_panic;
use crate::prefix::PrefixTable;

/// Where accepted packets go: the TUN itself, or a list for a library sink.
#[derive(Debug)]
pub(crate) enum Target {
    Tun(FdTun),
    List(PacketList),
}

impl TunWrite for Target {
    fn write_packet(&mut self, vnet_header: Option<&[u8]>, packet: &[u8]) -> WriteOutcome {
        match self {
            Target::Tun(tun) => tun.write_packet(vnet_header, packet),
            Target::List(list) => list.write_packet(vnet_header, packet),
        }
    }
}

/// A receive session as both Python and the data plane's thread hold it.
pub(crate) type SharedReceive = Arc<Mutex<Driven<Target>>>;

fn socket_error(err: SocketError) -> PyErr {
    let io = std::io::Error::from_raw_os_error(err.0);
    PyOSError::new_err((err.0, io.to_string()))
}

/// Counters reported per pump (or per `take_counts`): `(frames, payload_bytes, delivered,
/// delivered_bytes, extra_segments, spoofed, unparsable, offload_invalid, tun_dropped, tun_refused,
/// batches)`, `batches` being the reads that delivered packets.
type Counts = (u64, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64);
type PumpResult<'py> = (Option<Bound<'py, PyList>>, i64, usize, Counts);

fn counts(t: ReceiveTally) -> Counts {
    let i = &t.inbound;
    (
        t.frames,
        t.frame_bytes,
        i.delivered,
        i.delivered_bytes,
        i.extra_segments,
        i.spoofed,
        i.unparsable,
        i.offload_invalid,
        i.write_dropped,
        i.write_errors,
        t.batches,
    )
}

fn read_code(read: Read) -> i64 {
    match read {
        Read::Data(n) => n as i64,
        Read::Eof => -1,
        Read::WouldBlock => 0,
        // -2 - unread: the sender reset the connection with `unread` bytes queued (discarded).
        Read::Reset { unread } => -2 - unread as i64,
    }
}

fn lock(shared: &SharedReceive) -> MutexGuard<'_, Driven<Target>> {
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One accepted connection of a node's receiver on the native core: TLS, the signed hello, frames, the
/// source check, the TUN write (`tun_fd` given) or a list for a library sink (`tun_fd` None:
/// `take_packets`), and the ack, in one call per socket readiness event (`pump`). The socket and the TUN
/// stay owned by Python. `table` is shared, not copied (a reload's change in place applies at once);
/// `indexes` maps peer ids to their values in it: the session reads the proved peer's value once, at its
/// first frame, so a session costs the same with 10 peers known or 10,000. On a node's TUN path an
/// authenticated session is pumped by the data plane's thread instead (`DataPlane.watch`); Python then
/// reads its counts with `take_counts`, and what made the thread hand it back with `take_parked`.
#[pyclass(module = "vpn_packet._native", name = "ReceiveSession")]
pub struct ReceiveSession {
    pub(crate) shared: SharedReceive,
    indexes: Py<PyDict>,
    /// The data plane's token while it drives the session.
    pub(crate) token: Option<u64>,
}

/// A pump's or a park's answer, taken under the session's lock: the result, the output waiting, and the
/// counts since the last take.
type Taken = (Result<(Read, Vec<Event>), SocketError>, usize, Counts);

fn take(s: &mut Driven<Target>, result: Result<(Read, Vec<Event>), SocketError>) -> Taken {
    (result, s.session.unsent(), counts(s.take_counts()))
}

fn to_python(py: Python<'_>, (result, unsent, counts): Taken) -> PyResult<PumpResult<'_>> {
    let (read, events) = result.map_err(socket_error)?;
    let events = if events.is_empty() {
        None
    } else {
        Some(events_to_python(py, events)?)
    };
    Ok((events, read_code(read), unsent, counts))
}

#[pymethods]
impl ReceiveSession {
    #[new]
    #[pyo3(signature = (security, sock, tun_fd, table, indexes, *, vnet_header = false, read_size = 262144, refuse = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        security: &TlsSecurity,
        sock: RawFd,
        tun_fd: Option<RawFd>,
        table: &PrefixTable,
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
            let session = CoreSession::new(conn, max_frame_size, vnet, read_size);
            Ok(ReceiveSession {
                shared: Arc::new(Mutex::new(Driven::new(
                    session,
                    target,
                    sock,
                    Arc::clone(&table.inner),
                ))),
                indexes,
                token: None,
            })
        })
    }

    /// One socket readiness event: one read, through TLS, the handshake and the frames; accepted packets
    /// written to the TUN (or collected for `take_packets`); then (with a TUN, when `flush`) the output, the
    /// ack among it, written to the socket (`flush=False`: the caller writes it later with `flush`, so that
    /// the reply a delivered packet provokes can leave before its ack). The GIL is released throughout.
    /// Returns `(events, read, unsent, counts)`: `events` None or the lifecycle events, `read` the bytes
    /// read (0: none ready, -1: end of stream; -2 - n: the sender reset the connection, `n` bytes were
    /// queued unread and are discarded), `unsent` output bytes the socket did not take, `counts` what was
    /// counted since the last call (see `take_counts`). Raises `OSError` for a failed socket call.
    #[pyo3(signature = (flush = true))]
    fn pump<'py>(&mut self, py: Python<'py>, flush: bool) -> PyResult<PumpResult<'py>> {
        no_panic(|| {
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
            let shared = &self.shared;
            let taken = py.detach(|| {
                let mut s = lock(shared);
                let to_tun = matches!(s.target, Target::Tun(_));
                let result = s.pump(index_of, flush && to_tun);
                take(&mut s, result)
            });
            to_python(py, taken)
        })
    }

    /// What the data plane's thread met when it handed the session back (`DataPlane.take_parked`), in
    /// `pump`'s form (`events`, `read`, `unsent`, `counts`); `(None, 0, unsent, counts)` when it handed it
    /// back for output the socket would not take. Raises `OSError` for the socket's error.
    fn take_parked<'py>(&mut self, py: Python<'py>) -> PyResult<PumpResult<'py>> {
        no_panic(|| {
            let mut s = lock(&self.shared);
            let parked = s.take_parked().unwrap_or(Ok((Read::WouldBlock, Vec::new())));
            let taken = take(&mut s, parked);
            drop(s);
            to_python(py, taken)
        })
    }

    /// What was counted since the last call (or `pump`), in `pump`'s `counts` form.
    fn take_counts(&mut self) -> Counts {
        counts(lock(&self.shared).take_counts())
    }

    /// Writes what output the socket takes (the library path calls it once the sink has the packets, so
    /// the ack follows the delivery); returns the bytes still waiting. Raises `OSError` for a failed send.
    fn flush(&mut self, py: Python<'_>) -> PyResult<usize> {
        no_panic(|| {
            let shared = &self.shared;
            py.detach(|| lock(shared).flush()).map_err(socket_error)
        })
    }

    /// The packets collected since the last call (the library path), in order.
    fn take_packets<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        no_panic(|| {
            let mut s = lock(&self.shared);
            let Target::List(list) = &mut s.target else {
                return Ok(PyList::empty(py));
            };
            let packets = PyList::new(py, list.iter().map(|packet| PyBytes::new(py, packet)))?;
            list.clear();
            Ok(packets)
        })
    }

    /// The routing table or the peers' values in it changed (a reload that replaced the table).
    fn set_route(&mut self, py: Python<'_>, table: &PrefixTable, indexes: Py<PyDict>) {
        let mut s = lock(&self.shared);
        s.routes = Arc::clone(&table.inner);
        s.session.reroute();
        if let Some(peer) = s.session.connection().peer_id() {
            s.index = indexes
                .bind(py)
                .get_item(peer)
                .ok()
                .flatten()
                .and_then(|value| value.extract::<u32>().ok())
                .unwrap_or(NO_PEER);
        }
        self.indexes = indexes;
    }

    /// Ends the connection from this side (close_notify into the output; `flush` writes it).
    fn close(&mut self) {
        lock(&self.shared).session.connection_mut().close();
    }

    /// Whether the connection runs TLS (False: an insecure node's plaintext).
    #[getter]
    fn encrypted(&self) -> bool {
        lock(&self.shared).session.connection().encrypted()
    }

    /// `"tls"`, `"challenge"`, `"answer"`, `"established"` or `"closed"`.
    #[getter]
    fn stage(&self) -> &'static str {
        lock(&self.shared).session.connection().stage().name()
    }

    /// The proved peer, once established.
    #[getter]
    fn peer_id(&self) -> Option<String> {
        lock(&self.shared)
            .session
            .connection()
            .peer_id()
            .map(str::to_owned)
    }

    /// The failure that ended the connection, if one did.
    #[getter]
    fn failure(&self) -> Option<Failed> {
        lock(&self.shared)
            .session
            .connection()
            .failure()
            .map(crate::connection::failed)
    }

    /// Frames taken so far (what the acks count).
    #[getter]
    fn frames(&self) -> u64 {
        lock(&self.shared).session.connection().counts().frames
    }

    /// Frames acknowledged so far: the count of the last ack queued (it has left once `unsent` is 0).
    #[getter]
    fn acked(&self) -> u64 {
        lock(&self.shared).session.connection().counts().acked
    }

    /// Frames whose ack the kernel has taken: the count of the last ack written whole (what a broken
    /// connection's sender has heard of; the rest is counted `unacknowledged`).
    #[getter]
    fn acked_out(&self) -> u64 {
        lock(&self.shared).acked_out()
    }

    /// Seconds since bytes were last read (None: never).
    #[getter]
    fn quiet_for(&self) -> Option<f64> {
        lock(&self.shared)
            .last_data()
            .map(|at| at.elapsed().as_secs_f64())
    }

    /// The errno of a TUN write that found the device gone (0: none).
    #[getter]
    fn fatal_errno(&self) -> i32 {
        lock(&self.shared).session.counts().fatal_errno
    }

    /// Output bytes not written yet.
    #[getter]
    fn unsent(&self) -> usize {
        lock(&self.shared).session.unsent()
    }

    /// Bytes held of collected packets not taken yet, and of a partial frame or handshake message.
    #[getter]
    fn buffered(&self) -> usize {
        let s = lock(&self.shared);
        let held = match &s.target {
            Target::Tun(_) => 0,
            Target::List(list) => list.data.len(),
        };
        s.session.connection().buffered() + held
    }

    /// The TLS key exchange group negotiated, once known.
    #[getter]
    fn key_exchange_group(&self) -> Option<String> {
        lock(&self.shared).session.connection().key_exchange_group()
    }

    /// Whether the data plane's thread drives the session now.
    #[getter]
    fn on_data_plane(&self) -> bool {
        self.token.is_some()
    }

    fn __repr__(&self) -> String {
        format!("<ReceiveSession {} frames={}>", self.stage(), self.frames())
    }
}

/// Registers `ReceiveSession`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ReceiveSession>()?;
    m.add("NO_PEER", NO_PEER)?;
    Ok(())
}
