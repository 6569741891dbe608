//! One connection on a node's sending side, natively: the TLS handshake and the signed hello of a client
//! [`Connection`], then frames encrypted and written to the socket in the call that hands them over
//! ([`SendSession::send_framed`]), and the acks read back in one call per socket readiness event
//! ([`SendSession::pump`]); the mirror of [`crate::receive::ReceiveSession`] (issue 20, item 3, sending
//! side). The binding runs the system calls and the crypto with the GIL released, and no Python object is
//! made per packet.
//!
//! The socket stays owned by the caller (Python connects it, watches it for readiness and closes it); the
//! system calls here are the non-blocking `recv` and `send` of [`crate::receive`]. Output the socket does
//! not take waits here ([`SendSession::unsent`]); the caller watches for writability and calls
//! [`SendSession::flush`], and waits for the output to drain before it writes more once it is large.
//! What waits is bounded by the caller's in-flight window (bytes written and not acknowledged, which
//! includes what was never written to the socket) plus TLS overhead: a batch is taken whole, because a
//! batch is one receipt whose fate must be all-or-acknowledged-part, never "half taken".

use std::os::fd::RawFd;

use crate::connection::{Connection, Event, SendError, Stage};
use crate::framing::{LENGTH_PREFIX_LEN, OFFLOAD_FLAG};
use crate::ledger::{FastOwner, Ledger};
use crate::receive::{recv, send, write_output, Read, SocketError};

/// What one [`SendSession::pump`] gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Pumped {
    /// What the socket read gave.
    pub read: Read,
    /// Lifecycle events (established, refused, failed, closed); none on the fast path.
    pub events: Vec<Event>,
    /// Frames the peer acknowledged on this connection in all (cumulative).
    pub acked: u64,
    /// Output bytes the socket did not take.
    pub unsent: usize,
}

/// Why a send did not go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFailure {
    /// The connection refused the bytes (not established, closed, not whole frames); nothing was taken.
    Refused(SendError),
    /// The bytes were taken, and writing them to the socket failed (the connection is gone).
    Socket(SocketError),
}

/// Why the fast path left a batch to the worker (nothing was taken).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotTaken {
    /// The handshake is not done, or the connection ended (or is ending).
    NotEstablished,
    /// Output waits for the socket: the worker's slow path waits for it to drain.
    OutputWaiting,
    /// The in-flight window is full: the worker waits for acks.
    WindowFull,
    /// The connection refused the bytes (see [`SendError`]).
    Refused(SendError),
}

/// One client connection and its send path; see the module documentation.
pub struct SendSession {
    conn: Connection,
    ledger: Ledger,
    buffer: Vec<u8>,
    /// A write that failed at the end of a `pump` whose read had taken acks: reported by the next call,
    /// so that the caller first counts those acks (as [`crate::receive::ReceiveSession`] does).
    write_failed: Option<SocketError>,
}

impl std::fmt::Debug for SendSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendSession")
            .field("conn", &self.conn)
            .field("unsent", &self.unsent())
            .finish_non_exhaustive()
    }
}

impl SendSession {
    /// A session around a client [`Connection`] (its ClientHello already in the output: [`flush`] it);
    /// reads of at most `read_size` bytes (acks are 8 bytes each; the handshake's replies a few KiB).
    ///
    /// [`flush`]: SendSession::flush
    pub fn new(conn: Connection, read_size: usize) -> Self {
        SendSession {
            conn,
            ledger: Ledger::default(),
            buffer: vec![0; read_size.max(1)],
            write_failed: None,
        }
    }

    /// The connection (stage, counts, failure).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The connection, to close it.
    pub fn connection_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// One readiness event: one `recv` from `sock`; the bytes through TLS and the handshake (the server's
    /// challenge answered with the hello, its answer taken) or, once established, the acks; then what the
    /// connection has to say written to `sock`.
    pub fn pump(&mut self, sock: RawFd) -> Result<Pumped, SocketError> {
        if let Some(err) = self.write_failed.take() {
            return Err(err);
        }
        let read = recv(sock, &mut self.buffer)?;
        let events = match read {
            // A server sends no frames: the sink is never called.
            Read::Data(n) => self.conn.receive(&self.buffer[..n], |_, _| {}),
            Read::Eof => self.conn.receive_eof(),
            Read::WouldBlock | Read::Reset { .. } => Vec::new(),
        };
        self.ledger.settle(self.conn.counts().acked);
        // The acks read are counted by the caller; a failed write is the next call's error (a peer that
        // acknowledged what it delivered and then reset the connection: those packets are sent, not lost).
        let unsent = match self.flush(sock) {
            Ok(unsent) => unsent,
            Err(err) => {
                self.write_failed = Some(err);
                self.unsent()
            }
        };
        Ok(Pumped {
            read,
            events,
            acked: self.conn.counts().acked,
            unsent,
        })
    }

    /// Encrypts `wire` (`frames` whole frames, see [`Connection::send_framed`]) and writes what the socket
    /// takes; returns the output bytes still waiting.
    pub fn send_framed(&mut self, sock: RawFd, wire: &[u8], frames: u64) -> Result<usize, SendFailure> {
        self.take(sock, wire, frames, None)
            .map_err(SendFailure::Refused)?
            .map_err(SendFailure::Socket)?;
        self.flush(sock).map_err(SendFailure::Socket)
    }

    /// The connection takes `wire` (see [`Connection::send_framed_through`]: in plaintext the socket takes
    /// the batch where it lies when nothing waits before it, no copy) and the ledger records it (`fast`:
    /// the fast path's owner). `Ok(Err(_))`: taken, and the socket failed.
    fn take(
        &mut self,
        sock: RawFd,
        wire: &[u8],
        frames: u64,
        fast: Option<FastOwner>,
    ) -> Result<Result<(), SocketError>, SendError> {
        let payload_before = self.conn.counts().frame_bytes;
        let written = if self.write_failed.is_some() || sock < 0 {
            // The socket failed already (that failure is reported by the next flush): taken, not written.
            self.conn.send_framed(wire, frames).map(Ok)?
        } else {
            self.conn
                .send_framed_through(wire, frames, |bytes| send(sock, bytes))?
        };
        let payload = self.conn.counts().frame_bytes - payload_before;
        let fast = fast.map(|owner| (owner, frame_payload_sizes(wire)));
        self.ledger.written(frames, wire.len() as u64, payload, fast);
        Ok(written)
    }

    /// The fast path (a TUN read written straight from the dispatcher's queues): `wire`, `frames` whole
    /// frames, taken and written only while the connection is established, no output waits for the socket
    /// and the batch fits the in-flight `window` (bytes on the wire; a batch larger than the window fits
    /// only when nothing is in flight). Its fate is counted into `owner`'s counters (see
    /// [`crate::ledger`]). Returns the output bytes the socket did not take (the caller must watch for
    /// writability then), or why nothing was taken. A socket that fails after the batch was taken is
    /// reported by the next [`pump`](Self::pump), as for a write inside it: the batch is then lost in
    /// flight unless acknowledged.
    pub fn send_fast(
        &mut self,
        sock: RawFd,
        wire: &[u8],
        frames: u64,
        window: u64,
        owner: FastOwner,
    ) -> Result<usize, NotTaken> {
        if sock < 0 || self.write_failed.is_some() || self.conn.stage() != Stage::Established {
            return Err(NotTaken::NotEstablished);
        }
        if self.unsent() > 0 {
            return Err(NotTaken::OutputWaiting);
        }
        let in_flight = self.ledger.wire_in_flight();
        if in_flight > 0 && in_flight + wire.len() as u64 > window {
            return Err(NotTaken::WindowFull);
        }
        let payload_before = self.conn.counts().frame_bytes;
        self.conn.send_framed(wire, frames).map_err(NotTaken::Refused)?;
        let payload = self.conn.counts().frame_bytes - payload_before;
        let sizes = frame_payload_sizes(wire);
        self.ledger
            .written(frames, wire.len() as u64, payload, Some((owner, sizes)));
        match write_output(&mut self.conn, sock) {
            Ok(unsent) => Ok(unsent),
            Err(err) => {
                self.write_failed = Some(err);
                Ok(self.unsent())
            }
        }
    }

    /// The connection ended (either side; reported to the caller by a failed call or an event): the fast
    /// batches it had in flight resolve with the part the peer acknowledged, the rest counted lost.
    /// Returns the fast frames lost. Idempotent.
    pub fn fail_in_flight(&mut self) -> u64 {
        self.ledger.settle(self.conn.counts().acked);
        self.ledger.fail()
    }

    /// The in-flight ledger (both writers).
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// A keepalive frame, written at once; returns the output bytes still waiting.
    pub fn send_keepalive(&mut self, sock: RawFd) -> Result<usize, SendFailure> {
        self.conn.send_keepalive().map_err(SendFailure::Refused)?;
        self.flush(sock).map_err(SendFailure::Socket)
    }

    /// Writes what output the socket takes; returns the bytes still waiting.
    pub fn flush(&mut self, sock: RawFd) -> Result<usize, SocketError> {
        if let Some(err) = self.write_failed.take() {
            return Err(err);
        }
        write_output(&mut self.conn, sock)
    }

    /// Ends the connection from this side: close_notify into the output (write it with `flush`).
    pub fn close(&mut self) {
        self.conn.close();
    }

    /// Output bytes not written yet.
    pub fn unsent(&self) -> usize {
        self.conn.output().len()
    }
}

/// The payload size of each frame of `wire` (whole frames, checked by the connection before; keepalives
/// are not frames).
fn frame_payload_sizes(wire: &[u8]) -> Vec<u32> {
    let mut sizes = Vec::new();
    let mut at = 0;
    while let Some(prefix) = wire.get(at..at + LENGTH_PREFIX_LEN) {
        let raw = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        let len = raw & !OFFLOAD_FLAG;
        if raw != 0 {
            sizes.push(len);
        }
        at += LENGTH_PREFIX_LEN + len as usize;
    }
    sizes
}
