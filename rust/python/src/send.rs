//! The Python face of [`vpn_packet_core::send`]: `SendSession`, one connection of a node's sending side,
//! pumped once per socket readiness event and written to in the call that hands it frames. Conversions
//! only.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyList;
use vpn_packet_core::connection::{Connection, SendError};
use vpn_packet_core::data_plane::{Source, Step};
use vpn_packet_core::receive::{Read, SocketError};
use vpn_packet_core::send::{Pumped, SendFailure, SendSession as CoreSession};

use crate::buffer::PacketBytes;
use crate::connection::{config_error, events_to_python, Failed, TlsSecurity};
use crate::errors::no_panic;

pyo3::import_exception!(vpn_packet.errors, FramingError);

fn socket_error(err: SocketError) -> PyErr {
    let io = std::io::Error::from_raw_os_error(err.0);
    PyOSError::new_err((err.0, io.to_string()))
}

fn send_failure(failure: SendFailure) -> PyErr {
    match failure {
        SendFailure::Socket(err) => socket_error(err),
        SendFailure::Refused(err @ (SendError::Unframed { .. } | SendError::Miscounted { .. })) => {
            FramingError::new_err((err.to_string(), err.reason()))
        }
        SendFailure::Refused(err) => PyValueError::new_err(err.to_string()),
    }
}

type PumpResult<'py> = (Option<Bound<'py, PyList>>, i64, usize, u64);

/// One connection of a node's sending side on the native core: TLS (rustls), the signed hello and the
/// answer, then frames encrypted and written in the call that takes them (`send_framed`), acks read in
/// one call per readiness event (`pump`). The socket (`sock`, connected, non-blocking) stays owned by
/// Python. Made by `TlsSecurity`'s rules for dialling `peer_id`; its ClientHello waits in the output
/// (`flush` writes it).
#[pyclass(module = "vpn_packet._native", name = "SendSession")]
pub struct SendSession {
    shared: Arc<Mutex<SharedSession>>,
    /// The data plane's token while its thread reads the acks.
    pub(crate) token: Option<u64>,
}

/// The session and its socket, shared with the dispatcher's queues (`DestinationQueues.set_fast`), whose
/// fast path writes a TUN read into it without Python, on the event loop's thread or the data plane's.
/// The fast path only ever `try_lock`s (it never waits: a session in use goes the worker's way).
pub struct SharedSession {
    pub session: CoreSession,
    pub sock: RawFd,
    /// The data plane's thread reads the acks now (see `SendSource`).
    pub watched: bool,
    /// What the thread's read met when it handed the session back.
    parked: Option<Result<Pumped, SocketError>>,
}

fn lock_shared(shared: &Mutex<SharedSession>) -> MutexGuard<'_, SharedSession> {
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A session's ack reads on the data plane's thread (`DataPlane.watch_send`): each readiness event pumps
/// it (read, decrypt, acks; the ledger settles the fast path's batches natively), until the read meets
/// anything but acks (an event, the end, an error, output the socket would not take): then the session is
/// handed back. Python hands it over only while none of its own batches wait for acks.
pub(crate) struct SendSource(pub Arc<Mutex<SharedSession>>);

impl Source for SendSource {
    fn fd(&self) -> RawFd {
        lock_shared(&self.0).sock
    }

    fn readable(&self) -> Step {
        let mut guard = lock_shared(&self.0);
        let s = &mut *guard;
        if !s.watched {
            return Step::Idle;
        }
        let result = s.session.pump(s.sock);
        let steady = match &result {
            Ok(p) => {
                p.events.is_empty() && matches!(p.read, Read::Data(_) | Read::WouldBlock) && p.unsent == 0
            }
            Err(_) => false,
        };
        if steady {
            return Step::Idle;
        }
        s.parked = Some(result);
        s.watched = false;
        Step::Park
    }

    fn due(&self) -> Step {
        Step::Idle
    }
}

fn pumped_to_python(py: Python<'_>, pumped: Pumped) -> PyResult<PumpResult<'_>> {
    let read = match pumped.read {
        Read::Data(n) => n as i64,
        Read::Eof => -1,
        Read::WouldBlock | Read::Reset { .. } => 0,
    };
    let events = if pumped.events.is_empty() {
        None
    } else {
        Some(events_to_python(py, pumped.events)?)
    };
    Ok((events, read, pumped.unsent, pumped.acked))
}

impl SendSession {
    fn lock(&self) -> MutexGuard<'_, SharedSession> {
        // A panic inside (turned into an error by `no_panic`) leaves the data as consistent as any error.
        self.shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The shared session, for the queues' fast path.
    pub fn shared(&self) -> Arc<Mutex<SharedSession>> {
        Arc::clone(&self.shared)
    }

    /// Marks the session driven by the data plane's thread, or not (a late event then does nothing).
    pub(crate) fn set_watched(&self, watched: bool) {
        let mut s = self.lock();
        s.watched = watched;
        if watched {
            s.parked = None;
        }
    }
}

#[pymethods]
impl SendSession {
    #[new]
    #[pyo3(signature = (security, sock, peer_id, epoch, *, read_size = 65536))]
    fn new(
        security: &TlsSecurity,
        sock: RawFd,
        peer_id: &str,
        epoch: u64,
        read_size: usize,
    ) -> PyResult<Self> {
        no_panic(|| {
            if sock < 0 {
                return Err(PyValueError::new_err(format!("bad socket descriptor {sock}")));
            }
            let conn = Connection::client(&security.inner, peer_id, epoch).map_err(config_error)?;
            Ok(SendSession {
                shared: Arc::new(Mutex::new(SharedSession {
                    session: CoreSession::new(conn, read_size),
                    sock,
                    watched: false,
                    parked: None,
                })),
                token: None,
            })
        })
    }

    /// One socket readiness event: one read, through TLS and the handshake (or the acks), then the output
    /// written. The GIL is released throughout. Returns `(events, read, unsent, acked)`: `events` None or
    /// the lifecycle events, `read` the bytes read (0: none ready, -1: end of stream), `unsent` output
    /// bytes the socket did not take, `acked` the frames the peer acknowledged in all. Raises `OSError`
    /// for a failed socket call.
    fn pump<'py>(&mut self, py: Python<'py>) -> PyResult<PumpResult<'py>> {
        no_panic(|| {
            let mut guard = self.lock();
            let shared = &mut *guard;
            let (inner, sock) = (&mut shared.session, shared.sock);
            let pumped = py.detach(|| inner.pump(sock)).map_err(socket_error)?;
            pumped_to_python(py, pumped)
        })
    }

    /// What the data plane's thread met when it handed the session back (`DataPlane.take_parked`), in
    /// `pump`'s form. Raises `OSError` for the socket's error.
    fn take_parked<'py>(&mut self, py: Python<'py>) -> PyResult<PumpResult<'py>> {
        no_panic(|| {
            let parked = self.lock().parked.take();
            match parked {
                Some(result) => pumped_to_python(py, result.map_err(socket_error)?),
                None => {
                    let s = self.lock();
                    Ok((None, 0, s.session.unsent(), s.session.connection().counts().acked))
                }
            }
        })
    }

    /// Whether the data plane's thread reads the acks now.
    #[getter]
    fn on_data_plane(&self) -> bool {
        self.token.is_some()
    }

    /// `count` packets already framed in `data` (bytes, bytearray or memoryview), encrypted and written to
    /// the socket in this call (the GIL released for `bytes`); returns the output bytes the socket did not
    /// take yet (`flush` once it is writable). Raises `FramingError` (nothing taken) when `data` is not
    /// whole frames the receiver accepts or holds another count than `count`, `ValueError` before the
    /// handshake is done or after the connection closed, `OSError` for a failed send (the bytes were taken
    /// then: the connection is gone).
    fn send_framed(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>, count: u64) -> PyResult<usize> {
        no_panic(|| {
            let mut guard = self.lock();
            let shared = &mut *guard;
            let (inner, sock) = (&mut shared.session, shared.sock);
            let held = PacketBytes::get(data)?;
            let wire = held.as_slice();
            let result = match &held {
                // Immutable: safe to read without the GIL.
                PacketBytes::Bytes(_) => py.detach(|| inner.send_framed(sock, wire, count)),
                PacketBytes::Buffer(_) => inner.send_framed(sock, wire, count),
            };
            result.map_err(send_failure)
        })
    }

    /// A keepalive frame, written at once; returns the output bytes not written yet.
    fn send_keepalive(&mut self) -> PyResult<usize> {
        no_panic(|| {
            let mut guard = self.lock();
            let sock = guard.sock;
            guard.session.send_keepalive(sock).map_err(send_failure)
        })
    }

    /// Writes what output the socket takes; returns the bytes still waiting. Raises `OSError` for a
    /// failed send.
    fn flush(&mut self, py: Python<'_>) -> PyResult<usize> {
        no_panic(|| {
            let mut guard = self.lock();
            let shared = &mut *guard;
            let (inner, sock) = (&mut shared.session, shared.sock);
            py.detach(|| inner.flush(sock)).map_err(socket_error)
        })
    }

    /// Ends the connection from this side (close_notify into the output; `flush` writes it).
    fn close(&mut self) {
        self.lock().session.close();
    }

    /// Python is about to close the socket: the session forgets its descriptor, so that no later call
    /// can write into another socket that reuses the number (they fail with `EBADF` instead).
    fn forget_socket(&mut self) {
        self.lock().sock = -1;
    }

    /// Whether the connection runs TLS (False: an insecure node's plaintext).
    #[getter]
    fn encrypted(&self) -> bool {
        self.lock().session.connection().encrypted()
    }

    /// `"tls"`, `"challenge"`, `"answer"`, `"established"` or `"closed"`.
    #[getter]
    fn stage(&self) -> &'static str {
        self.lock().session.connection().stage().name()
    }

    /// The peer dialled, once established.
    #[getter]
    fn peer_id(&self) -> Option<String> {
        self.lock().session.connection().peer_id().map(str::to_owned)
    }

    /// The connection ended (reported by a failed call or an event): the fast path's batches still in
    /// flight resolve with the part the peer acknowledged, the rest counted lost (into their
    /// destinations' counters). Returns the fast frames lost. Idempotent.
    fn fail_in_flight(&self) -> u64 {
        self.lock().session.fail_in_flight()
    }

    /// Bytes on the wire written and not acknowledged, by both writers (what the in-flight window bounds).
    #[getter]
    fn wire_in_flight(&self) -> u64 {
        self.lock().session.ledger().wire_in_flight()
    }

    /// Frames the fast path wrote and the peer has not acknowledged yet.
    #[getter]
    fn fast_in_flight(&self) -> u64 {
        self.lock().session.ledger().fast_in_flight()
    }

    /// Frames the fast path wrote on this connection.
    #[getter]
    fn fast_frames(&self) -> u64 {
        self.lock().session.ledger().fast_frames()
    }

    /// Bytes on the wire the fast path wrote on this connection.
    #[getter]
    fn fast_wire_bytes(&self) -> u64 {
        self.lock().session.ledger().fast_wire()
    }

    /// Payload bytes of the batches the peer acknowledged whole (both writers).
    #[getter]
    fn acked_payload(&self) -> u64 {
        self.lock().session.ledger().acked_payload()
    }

    /// The failure that ended the connection, if one did.
    #[getter]
    fn failure(&self) -> Option<Failed> {
        self.lock()
            .session
            .connection()
            .failure()
            .map(crate::connection::failed)
    }

    /// Frames sent (packet and offload).
    #[getter]
    fn frames(&self) -> u64 {
        self.lock().session.connection().counts().frames
    }

    /// Frames the peer acknowledged.
    #[getter]
    fn acked(&self) -> u64 {
        self.lock().session.connection().counts().acked
    }

    /// Keepalives sent.
    #[getter]
    fn keepalives(&self) -> u64 {
        self.lock().session.connection().counts().keepalives
    }

    /// TLS bytes received and produced.
    #[getter]
    fn tls_bytes(&self) -> (u64, u64) {
        let counts = self.lock().session.connection().counts();
        (counts.tls_bytes_in, counts.tls_bytes_out)
    }

    /// Output bytes not written yet.
    #[getter]
    fn unsent(&self) -> usize {
        self.lock().session.unsent()
    }

    /// The TLS key exchange group negotiated, once known.
    #[getter]
    fn key_exchange_group(&self) -> Option<String> {
        self.lock().session.connection().key_exchange_group()
    }

    /// The names the server's certificate carries (CA mode: the ones its id was checked against).
    #[getter]
    fn peer_names(&self) -> Vec<String> {
        self.lock().session.connection().peer_names()
    }

    fn __repr__(&self) -> String {
        format!(
            "<SendSession {} frames={} acked={}>",
            self.stage(),
            self.frames(),
            self.acked()
        )
    }
}

/// Registers `SendSession`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<SendSession>()?;
    Ok(())
}
