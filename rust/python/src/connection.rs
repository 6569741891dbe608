//! The connection core for Python: `TlsSecurity` (a node's TLS setup), `TlsConnection` (one connection,
//! client or server) and its lifecycle events as named types (`Established`, `Refused`, `Failed`,
//! `Closed`). The protocol is `vpn_packet_core::connection` and `vpn_packet_core::tls`; this file converts.
//!
//! A receiver's connections use `ReceiveSession` (`receive.rs`), which hands frames to the TUN natively,
//! and a sender's `SendSession` (`send.rs`), which writes to the socket in the call that takes a batch;
//! a `TlsConnection` keeps its I/O with the caller (a server keeps the frames it receives until
//! `take_frames`, at most `MAX_PENDING_FRAME_BYTES`), for tests and tools.

use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};
use vpn_packet_core::connection::{Connection, Event, Failure, SendError, MAX_OUTPUT};
use vpn_packet_core::handshake::Answer;
use vpn_packet_core::tls::{self, ConfigError, Security, Trust, KEY_EXCHANGE_GROUPS};

use crate::buffer::{with_bytes, PacketBytes};
use crate::errors::no_panic;

pyo3::import_exception!(vpn_packet.errors, IdentityError);

/// Frame bytes a server connection keeps for `take_frames` before `receive` refuses more.
const MAX_PENDING_FRAME_BYTES: usize = 4 * 1024 * 1024;

pub(crate) fn config_error(err: ConfigError) -> PyErr {
    IdentityError::new_err(format!("{} ({})", err.detail, err.reason))
}

/// A node's TLS setup: its key or certificate, and whom it trusts. Checked when made: a key file,
/// certificate or CA that cannot be used raises `IdentityError` naming what is wrong.
#[pyclass(module = "vpn_packet._native", name = "TlsSecurity", frozen)]
pub struct TlsSecurity {
    pub(crate) inner: Security,
}

#[pymethods]
impl TlsSecurity {
    /// Key mode: `key_file` is the PEM key file `vpn-packet genkey` writes; `peer_keys` maps peer ids to
    /// raw 32-byte public keys.
    #[staticmethod]
    #[pyo3(signature = (local_id, key_file, peer_keys, *, max_frame_size = 65535))]
    fn with_keys(
        local_id: &str,
        key_file: &[u8],
        peer_keys: Vec<(String, Vec<u8>)>,
        max_frame_size: usize,
    ) -> PyResult<Self> {
        no_panic(|| {
            let peers = peer_keys.iter().map(|(id, key)| (id.as_str(), key.as_slice()));
            let inner = Security::with_keys(local_id, key_file, peers).map_err(config_error)?;
            Ok(TlsSecurity {
                inner: inner.with_max_frame_size(max_frame_size),
            })
        })
    }

    /// CA mode: this node's certificate (PEM, then any intermediates), private key and CA file; the ids of
    /// the configured peers.
    #[staticmethod]
    #[pyo3(signature = (local_id, cert, key, ca, peers, *, max_frame_size = 65535))]
    fn with_ca(
        local_id: &str,
        cert: &[u8],
        key: &[u8],
        ca: &[u8],
        peers: Vec<String>,
        max_frame_size: usize,
    ) -> PyResult<Self> {
        no_panic(|| {
            let inner = Security::with_ca(local_id, cert, key, ca, peers.iter().map(String::as_str))
                .map_err(config_error)?;
            Ok(TlsSecurity {
                inner: inner.with_max_frame_size(max_frame_size),
            })
        })
    }

    /// Insecure mode: plaintext connections, every stage after TLS the same; a peer is whoever it claims
    /// to be among `peers` (the configured peers' ids). For labs and benchmarks only.
    #[staticmethod]
    #[pyo3(signature = (local_id, peers, *, max_frame_size = 65535))]
    fn insecure(local_id: &str, peers: Vec<String>, max_frame_size: usize) -> PyResult<Self> {
        no_panic(|| {
            let inner =
                Security::insecure(local_id, peers.iter().map(String::as_str)).map_err(config_error)?;
            Ok(TlsSecurity {
                inner: inner.with_max_frame_size(max_frame_size),
            })
        })
    }

    /// Key mode: trusts `set`'s peers with their keys (added, or rekeyed) and no longer `removed`'s, in
    /// place, for this setup and every connection it makes from now on: the work of the peers changed,
    /// however many are known. A handshake already past its hello is not judged again (the receiver
    /// closes one that spans a change). Raises `IdentityError` (a key that cannot be trusted, two peers
    /// with one key, an id twice) before anything changed, `ValueError` in CA mode.
    #[pyo3(signature = (set, removed = Vec::new()))]
    fn update_keys(&self, set: Vec<(String, Vec<u8>)>, removed: Vec<String>) -> PyResult<()> {
        no_panic(|| {
            let Trust::Keys { peers, .. } = self.inner.trust() else {
                return Err(PyValueError::new_err("CA mode has no peer keys"));
            };
            peers
                .update(
                    set.iter().map(|(id, key)| (id.as_str(), key.as_slice())),
                    removed.iter().map(String::as_str),
                )
                .map_err(config_error)
        })
    }

    /// CA and insecure modes: adds `added` to the configured peers and drops `removed`, in place, for this
    /// setup and every connection it makes from now on (O(the peers changed)). `ValueError` in key mode.
    #[pyo3(signature = (added, removed = Vec::new()))]
    fn update_ids(&self, added: Vec<String>, removed: Vec<String>) -> PyResult<()> {
        no_panic(|| {
            let (Trust::Ca { peers, .. } | Trust::Insecure { peers }) = self.inner.trust() else {
                return Err(PyValueError::new_err("key mode trusts keys: update_keys"));
            };
            peers.update(
                added.iter().map(String::as_str),
                removed.iter().map(String::as_str),
            );
            Ok(())
        })
    }

    /// The number of peers trusted.
    #[getter]
    fn peer_count(&self) -> usize {
        match self.inner.trust() {
            Trust::Keys { peers, .. } => peers.len(),
            Trust::Ca { peers, .. } | Trust::Insecure { peers } => peers.len(),
        }
    }

    /// The id this node announces.
    #[getter]
    fn local_id(&self) -> &str {
        self.inner.local_id()
    }

    /// `"key"`, `"ca"` or `"insecure"`.
    #[getter]
    fn mode(&self) -> &'static str {
        self.inner.trust().mode()
    }

    /// A client connection dialling `peer_id` with connection `epoch`; its first TLS bytes are in the
    /// output already (in plaintext it waits for the server's challenge).
    fn client(&self, peer_id: &str, epoch: u64) -> PyResult<TlsConnection> {
        no_panic(|| {
            let inner = Connection::client(&self.inner, peer_id, epoch).map_err(config_error)?;
            Ok(TlsConnection::new(inner))
        })
    }

    /// A server connection for one accepted socket (in plaintext its challenge is in the output at once). `refuse` (an answer reason such as
    /// `"too_many_connections"`) refuses every hello with that reason.
    #[pyo3(signature = (refuse = None))]
    fn server(&self, refuse: Option<&str>) -> PyResult<TlsConnection> {
        no_panic(|| {
            let inner = Connection::server(&self.inner, refusal(refuse)?).map_err(config_error)?;
            Ok(TlsConnection::new(inner))
        })
    }
}

/// The answer of a refusal reason (`"too_many_connections"`, ...), or None.
pub(crate) fn refusal(reason: Option<&str>) -> PyResult<Option<Answer>> {
    reason
        .map(|reason| {
            Answer::ALL
                .into_iter()
                .find(|a| *a != Answer::Accepted && a.reason() == reason)
                .ok_or_else(|| PyValueError::new_err(format!("{reason:?} is not a refusal reason")))
        })
        .transpose()
}

/// Checks CA-mode files (PEM bytes) as a node does at start; raises `IdentityError` naming what webpki (or
/// the key, or the CA file) refuses. Returns the names the certificate carries.
#[pyfunction]
pub fn check_ca_files(cert: &[u8], key: &[u8], ca: &[u8]) -> PyResult<Vec<String>> {
    no_panic(|| {
        tls::check_ca_files(cert, key, ca)
            .map(|files| files.names())
            .map_err(config_error)
    })
}

/// The handshake is done: `peer_id` is the configured peer (client: the one dialled; server: the one its
/// key or certificate proved), `announced_id` the id the other side announced, `epoch` the hello's.
#[pyclass(module = "vpn_packet._native", name = "Established", frozen, get_all)]
pub struct Established {
    peer_id: String,
    announced_id: String,
    epoch: u64,
}

#[pymethods]
impl Established {
    fn __repr__(&self) -> String {
        format!(
            "Established(peer_id={:?}, announced_id={:?}, epoch={})",
            self.peer_id, self.announced_id, self.epoch
        )
    }
}

/// The server refused the client (on the client: the server's reason; on the server: its answer, and
/// `claimed`, the id the refused hello announced).
#[pyclass(module = "vpn_packet._native", name = "Refused", frozen, get_all)]
pub struct Refused {
    code: u8,
    reason: String,
    text: String,
    claimed: String,
}

#[pymethods]
impl Refused {
    fn __repr__(&self) -> String {
        format!("Refused(reason={:?}, text={:?})", self.reason, self.text)
    }
}

/// The connection failed: `reason` is one of `CONNECTION_FAILURE_REASONS`, `detail` says more.
#[pyclass(module = "vpn_packet._native", name = "Failed", frozen, get_all)]
pub struct Failed {
    reason: &'static str,
    detail: String,
}

#[pymethods]
impl Failed {
    fn __repr__(&self) -> String {
        format!("Failed(reason={:?}, detail={:?})", self.reason, self.detail)
    }
}

/// The peer closed an established connection.
#[pyclass(module = "vpn_packet._native", name = "Closed", frozen)]
pub struct Closed;

#[pymethods]
impl Closed {
    fn __repr__(&self) -> &'static str {
        "Closed()"
    }
}

pub(crate) fn failed(failure: &Failure) -> Failed {
    Failed {
        reason: failure.reason(),
        detail: failure.to_string(),
    }
}

pub(crate) fn events_to_python<'py>(py: Python<'py>, events: Vec<Event>) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for event in events {
        let item: Bound<'py, PyAny> = match event {
            Event::Established {
                peer_id,
                announced_id,
                epoch,
            } => Bound::new(
                py,
                Established {
                    peer_id,
                    announced_id,
                    epoch,
                },
            )?
            .into_any(),
            Event::Refused {
                code,
                reason,
                text,
                claimed,
            } => Bound::new(
                py,
                Refused {
                    code,
                    reason,
                    text,
                    claimed,
                },
            )?
            .into_any(),
            Event::Failed(failure) => Bound::new(py, failed(&failure))?.into_any(),
            Event::Closed => Bound::new(py, Closed)?.into_any(),
        };
        list.append(item)?;
    }
    Ok(list)
}

fn send_error(err: SendError) -> PyErr {
    PyValueError::new_err(err.to_string())
}

/// One node-to-node connection without I/O: the caller reads and writes the socket. Feed what was read to
/// `receive` (it returns lifecycle events, usually none), write what `take_output` returns.
#[pyclass(module = "vpn_packet._native", name = "TlsConnection")]
pub struct TlsConnection {
    inner: Connection,
    frame_data: Vec<u8>,
    frame_lengths: Vec<usize>,
}

impl TlsConnection {
    fn new(inner: Connection) -> Self {
        TlsConnection {
            inner,
            frame_data: Vec::new(),
            frame_lengths: Vec::new(),
        }
    }
}

#[pymethods]
impl TlsConnection {
    /// Takes TLS bytes read from the socket; returns the lifecycle events. A server keeps the frames for
    /// `take_frames` (raises `BufferError`, taking nothing, while more than 4 MiB wait there).
    fn receive<'py>(&mut self, py: Python<'py>, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
        no_panic(|| {
            if self.frame_data.len() > MAX_PENDING_FRAME_BYTES {
                return Err(PyBufferError::new_err(
                    "take_frames() first: the frames received wait there",
                ));
            }
            let TlsConnection {
                inner,
                frame_data,
                frame_lengths,
            } = self;
            let events = with_bytes(data, |bytes| {
                inner.receive(bytes, |_, payload| {
                    frame_data.extend_from_slice(payload);
                    frame_lengths.push(payload.len());
                })
            })?;
            events_to_python(py, events)
        })
    }

    /// The socket read returned 0: before the handshake is done, a `Failed("closed_early")`; after it,
    /// `Closed`.
    fn receive_eof<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        no_panic(|| events_to_python(py, self.inner.receive_eof()))
    }

    /// The frames received since the last call (server): packet payloads, and offload frames as their
    /// 10-byte virtio_net_hdr followed by the packet.
    fn take_frames<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        no_panic(|| {
            let list = PyList::empty(py);
            let mut at = 0;
            for &len in &self.frame_lengths {
                list.append(PyBytes::new(py, &self.frame_data[at..at + len]))?;
                at += len;
            }
            self.frame_data.clear();
            self.frame_lengths.clear();
            Ok(list)
        })
    }

    /// The TLS bytes to write to the socket (taken: the next call returns only newer ones).
    fn take_output<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.take_output())
    }

    /// Client: frames and encrypts `packets` into the output, as many as fit under `MAX_OUTPUT`; returns
    /// how many were taken (write the output, then send the rest). Raises `ValueError` before the
    /// handshake is done, after the connection closed, or for a packet frames cannot carry.
    fn send_packets(&mut self, packets: &Bound<'_, PyAny>) -> PyResult<usize> {
        no_panic(|| {
            let held = packets
                .try_iter()?
                .map(|item| PacketBytes::get(&item?))
                .collect::<PyResult<Vec<_>>>()?;
            self.inner
                .send_packets(held.iter().map(PacketBytes::as_slice))
                .map_err(send_error)
        })
    }

    /// Client: a keepalive frame.
    fn send_keepalive(&mut self) -> PyResult<()> {
        no_panic(|| self.inner.send_keepalive().map_err(send_error))
    }

    /// Ends the connection from this side (close_notify in the output).
    fn close(&mut self) {
        self.inner.close();
    }

    /// Whether this is the client (sending) side.
    #[getter]
    fn is_client(&self) -> bool {
        self.inner.is_client()
    }

    /// Whether the connection runs TLS (False: an insecure node's plaintext).
    #[getter]
    fn encrypted(&self) -> bool {
        self.inner.encrypted()
    }

    /// `"tls"`, `"challenge"`, `"answer"`, `"established"` or `"closed"`.
    #[getter]
    fn stage(&self) -> &'static str {
        self.inner.stage().name()
    }

    /// The failure that ended the connection, if one did.
    #[getter]
    fn failure(&self) -> Option<Failed> {
        self.inner.failure().map(failed)
    }

    /// The TLS key exchange group negotiated (`"X25519MLKEM768"`, `"X25519"`), once known.
    #[getter]
    fn key_exchange_group(&self) -> Option<String> {
        self.inner.key_exchange_group()
    }

    /// Client: frames sent. Server: frames taken.
    #[getter]
    fn frames(&self) -> u64 {
        self.inner.counts().frames
    }

    /// Client: frames the server acknowledged. Server: frames it acknowledged.
    #[getter]
    fn acked(&self) -> u64 {
        self.inner.counts().acked
    }

    /// Client: frames sent and not yet acknowledged.
    #[getter]
    fn in_flight(&self) -> u64 {
        self.inner.in_flight()
    }

    /// Keepalives sent (client) or received (server).
    #[getter]
    fn keepalives(&self) -> u64 {
        self.inner.counts().keepalives
    }

    /// TLS bytes received and produced.
    #[getter]
    fn tls_bytes(&self) -> (u64, u64) {
        let counts = self.inner.counts();
        (counts.tls_bytes_in, counts.tls_bytes_out)
    }

    fn __repr__(&self) -> String {
        format!(
            "<TlsConnection {} {} frames={} acked={}>",
            if self.inner.is_client() {
                "client"
            } else {
                "server"
            },
            self.stage(),
            self.frames(),
            self.acked()
        )
    }
}

/// Registers the classes, `check_ca_files` and the constants.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("KEY_EXCHANGE_GROUPS", PyTuple::new(py, KEY_EXCHANGE_GROUPS)?)?;
    m.add("CONNECTION_FAILURE_REASONS", PyTuple::new(py, Failure::REASONS)?)?;
    m.add("MAX_OUTPUT", MAX_OUTPUT)?;
    m.add_class::<TlsSecurity>()?;
    m.add_class::<TlsConnection>()?;
    m.add_class::<Established>()?;
    m.add_class::<Refused>()?;
    m.add_class::<Failed>()?;
    m.add_class::<Closed>()?;
    m.add_function(wrap_pyfunction!(check_ca_files, m)?)?;
    Ok(())
}
