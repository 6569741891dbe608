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

use crate::connection::{Connection, Event, SendError};
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

/// One client connection and its send path; see the module documentation.
pub struct SendSession {
    conn: Connection,
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
        if self.write_failed.is_some() {
            // The socket failed already: taken, and that failure reported (by the flush below).
            self.conn
                .send_framed(wire, frames)
                .map_err(SendFailure::Refused)?;
        } else {
            // In plaintext the socket takes the batch where it lies (no copy); what it does not take waits.
            self.conn
                .send_framed_through(wire, frames, |bytes| send(sock, bytes))
                .map_err(SendFailure::Refused)?
                .map_err(SendFailure::Socket)?;
        }
        self.flush(sock).map_err(SendFailure::Socket)
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
