//! One accepted connection on a node's receive path, natively: the socket read, TLS decrypted, the signed
//! hello judged ([`crate::connection`]), frames decoded, every packet's source checked and the accepted
//! ones written to the TUN ([`crate::inbound`]), and the ack written back to the socket, all in one call
//! per socket readiness event ([`ReceiveSession::pump`]), so the binding can run it with the GIL released
//! and no Python object per packet (issue 20, item 3, receiving side).
//!
//! The socket stays owned by the caller (Python accepts it, watches it for readiness and closes it);
//! the system calls here are non-blocking `recv` and `send` (`MSG_DONTWAIT`, and `MSG_NOSIGNAL`: a peer
//! gone is an error returned, never a signal). Output that does not fit in the socket waits here
//! ([`ReceiveSession::unsent`]); the caller watches for writability and calls [`ReceiveSession::flush`].
//! What waits is bounded by the connection's own bounds (acks, a handshake answer, an alert).

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use crate::connection::{Connection, Event};
use crate::data_plane::{Source, Step};
use crate::framing::FrameKind;
use crate::inbound::{Inbound, InboundCounts, TunWrite};
use crate::prefix::PrefixTable;

/// A peer index no prefix carries: every packet of a peer not in the table is dropped as spoofed.
pub const NO_PEER: u32 = u32::MAX;

/// What one socket read gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Bytes were read (and processed).
    Data(usize),
    /// The peer ended the stream.
    Eof,
    /// Nothing to read now.
    WouldBlock,
    /// The sender reset the connection (a pending `ECONNRESET`): the bytes still queued (`unread`) were
    /// counted lost by the sender, so they are discarded, never read (Linux still returns data queued
    /// before a reset; a receiver that was stalled must ask before delivering it).
    Reset { unread: usize },
}

/// Whether the sender reset `fd` (a pending `ECONNRESET`, taken by asking), and the bytes queued unread.
pub fn reset_by_sender(fd: RawFd) -> Option<usize> {
    let mut error: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `error` and `len` are live locals of the sizes passed.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut error as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || error != libc::ECONNRESET {
        return None;
    }
    let mut unread: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int into `unread`.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut unread as *mut libc::c_int) };
    Some(if rc == 0 { unread.max(0) as usize } else { 0 })
}

/// A socket system call failed with this errno (`ECONNRESET`, `EPIPE`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketError(pub i32);

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// One non-blocking `recv` into `buf`; `EINTR` is retried.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> Result<Read, SocketError> {
    loop {
        // SAFETY: `buf` is a live, writable slice of `buf.len()` bytes for the duration of the call.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n > 0 {
            return Ok(Read::Data(n as usize));
        }
        if n == 0 {
            return Ok(Read::Eof);
        }
        match errno() {
            libc::EINTR => continue,
            e if e == libc::EAGAIN || e == libc::EWOULDBLOCK => return Ok(Read::WouldBlock),
            e => return Err(SocketError(e)),
        }
    }
}

/// Non-blocking `send`s of `data` until it is all written or the socket is full; returns the bytes written.
pub fn send(fd: RawFd, data: &[u8]) -> Result<usize, SocketError> {
    let mut at = 0;
    while at < data.len() {
        let rest = &data[at..];
        // SAFETY: `rest` is a live slice; send only reads it.
        let n = unsafe {
            libc::send(
                fd,
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            at += n as usize;
            continue;
        }
        match errno() {
            libc::EINTR => continue,
            e if e == libc::EAGAIN || e == libc::EWOULDBLOCK => break,
            e => return Err(SocketError(e)),
        }
    }
    Ok(at)
}

/// Writes what of `conn`'s output `sock` takes; returns the bytes still waiting. Both sessions' `flush`.
pub fn write_output(conn: &mut Connection, sock: RawFd) -> Result<usize, SocketError> {
    let out = conn.output();
    if out.is_empty() {
        return Ok(0);
    }
    let written = send(sock, out)?;
    conn.consume_output(written);
    Ok(conn.output().len())
}

/// One server connection and its receive path; see the module documentation.
pub struct ReceiveSession {
    conn: Connection,
    inbound: Inbound,
    buffer: Vec<u8>,
    /// The sending peer's index in the routing table, resolved at its first frame.
    peer: Option<u32>,
    /// A write that failed at the end of a `pump` whose read had already gone to the TUN: reported by the
    /// next call, so that the caller first counts what that read delivered.
    write_failed: Option<SocketError>,
}

impl std::fmt::Debug for ReceiveSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiveSession")
            .field("conn", &self.conn)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl ReceiveSession {
    /// A session around a server [`Connection`]; `vnet_header`: the TUN takes virtio headers; reads of at
    /// most `read_size` bytes.
    pub fn new(conn: Connection, max_frame_size: usize, vnet_header: bool, read_size: usize) -> Self {
        ReceiveSession {
            conn,
            inbound: Inbound::new(max_frame_size, vnet_header),
            buffer: vec![0; read_size.max(1)],
            peer: None,
            write_failed: None,
        }
    }

    /// The connection (stage, counts, failure, peer).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The connection, to close it or to take its output.
    pub fn connection_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// The receive path's counters (frames are the connection's: `connection().counts().frames`).
    pub fn counts(&self) -> &InboundCounts {
        &self.inbound.counts
    }

    /// The routing table changed (a reload): the peer's index is looked up again at the next frame.
    pub fn reroute(&mut self) {
        self.peer = None;
    }

    /// One readiness event: one `recv` from `sock`; the bytes through TLS, the handshake and the frames;
    /// accepted packets to `tun` (the peer's index in `table` is `index_of(peer_id)`, [`NO_PEER`] when it
    /// has none); then, when `flush`, the output (acks, answers, alerts) written to `sock`. Returns what the
    /// read gave and the lifecycle events (usually none).
    pub fn pump<W: TunWrite>(
        &mut self,
        sock: RawFd,
        table: &PrefixTable<u32>,
        index_of: impl Fn(&str) -> u32,
        tun: &mut W,
        flush: bool,
    ) -> Result<(Read, Vec<Event>), SocketError> {
        if let Some(err) = self.write_failed.take() {
            return Err(err);
        }
        if let Some(unread) = reset_by_sender(sock) {
            return Ok((Read::Reset { unread }, Vec::new()));
        }
        let read = recv(sock, &mut self.buffer)?;
        let events = match read {
            Read::Data(n) => {
                let ReceiveSession {
                    conn,
                    inbound,
                    buffer,
                    peer,
                    ..
                } = self;
                conn.receive_frames(&buffer[..n], |peer_id, kind: FrameKind, payload| {
                    let index = *peer.get_or_insert_with(|| index_of(peer_id));
                    inbound.take_frame(kind, payload, table, index, tun);
                })
            }
            Read::Eof => self.conn.receive_eof(),
            Read::WouldBlock | Read::Reset { .. } => Vec::new(),
        };
        if flush {
            // The read's packets are on the TUN and its events happened: they are returned and counted;
            // the failed write is the next call's error (the socket stays readable once it failed).
            if let Err(err) = self.flush(sock) {
                self.write_failed = Some(err);
            }
        }
        Ok((read, events))
    }

    /// Writes what output the socket takes; returns the bytes still waiting.
    pub fn flush(&mut self, sock: RawFd) -> Result<usize, SocketError> {
        if let Some(err) = self.write_failed.take() {
            return Err(err);
        }
        write_output(&mut self.conn, sock)
    }

    /// Output bytes not written yet.
    pub fn unsent(&self) -> usize {
        self.conn.output().len()
    }
}

/// A routing table shared by a receiver's sessions and the thread that drives them: changed in place by a
/// reload (`StaticPeerDiscovery.update`), read once per socket read.
pub type SharedTable = Arc<RwLock<PrefixTable<u32>>>;

/// What a receive path did, cumulatively: the connection's frames and their payload bytes, the inbound
/// counts, and the reads that delivered packets (`batches`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiveTally {
    pub frames: u64,
    pub frame_bytes: u64,
    pub inbound: InboundCounts,
    pub batches: u64,
}

impl ReceiveTally {
    /// What `self` added since `before`.
    pub fn since(&self, before: &ReceiveTally) -> ReceiveTally {
        let (a, b) = (&self.inbound, &before.inbound);
        ReceiveTally {
            frames: self.frames - before.frames,
            frame_bytes: self.frame_bytes - before.frame_bytes,
            inbound: InboundCounts {
                delivered: a.delivered - b.delivered,
                delivered_bytes: a.delivered_bytes - b.delivered_bytes,
                spoofed: a.spoofed - b.spoofed,
                unparsable: a.unparsable - b.unparsable,
                offload_invalid: a.offload_invalid - b.offload_invalid,
                segmented: a.segmented - b.segmented,
                extra_segments: a.extra_segments - b.extra_segments,
                write_dropped: a.write_dropped - b.write_dropped,
                write_errors: a.write_errors - b.write_errors,
                fatal_errno: a.fatal_errno,
            },
            batches: self.batches - before.batches,
        }
    }
}

/// What a read on the data plane's thread met that is not steady work, kept for Python
/// ([`Driven::take_parked`]): the read and its lifecycle events, or the socket's error.
pub type Parked = Result<(Read, Vec<Event>), SocketError>;

/// One receive session with everything it needs to be pumped by itself: its socket, where its packets
/// go, the routing table and the peer's index in it. Driven by Python's loop ([`Driven::pump`]) until its
/// connection is authenticated, then, on a node's TUN path, by the data plane's thread (its [`Source`]
/// impl, while `watched`). Counters are cumulative; [`Driven::take_counts`] gives what was added since the
/// last call, whoever pumped.
#[derive(Debug)]
pub struct Driven<T> {
    pub session: ReceiveSession,
    pub target: T,
    pub sock: RawFd,
    pub routes: SharedTable,
    /// The peer's index in `routes` (set by Python when it hands the session over, and at a reroute).
    pub index: u32,
    /// Driven by the data plane's thread now.
    pub watched: bool,
    /// How long acks wait on the thread (see `tuning.ACK_DELAY`), unless `ack_bytes` of payload came since
    /// the last ack written (then at once: a bulk flow's window keeps moving).
    pub ack_delay: Duration,
    pub ack_bytes: u64,
    ack_due: bool,
    /// The connection's payload bytes when an ack was last written whole.
    bytes_acked_out: u64,
    parked: Option<Parked>,
    batches: u64,
    taken: ReceiveTally,
    last_data: Option<Instant>,
    acked_out: u64,
}

impl<T: TunWrite> Driven<T> {
    /// A session to be pumped on `sock`, its packets to `target`.
    pub fn new(session: ReceiveSession, target: T, sock: RawFd, routes: SharedTable) -> Self {
        Driven {
            session,
            target,
            sock,
            routes,
            index: NO_PEER,
            watched: false,
            ack_delay: Duration::ZERO,
            ack_bytes: u64::MAX,
            ack_due: false,
            bytes_acked_out: 0,
            parked: None,
            batches: 0,
            taken: ReceiveTally::default(),
            last_data: None,
            acked_out: 0,
        }
    }

    /// Hands the session to the data plane's thread: `index` is its peer's value in `routes`, acks wait
    /// `ack_delay` there.
    pub fn hand_over(&mut self, index: u32, ack_delay: Duration, ack_bytes: u64) {
        self.index = index;
        self.ack_delay = ack_delay;
        self.ack_bytes = ack_bytes;
        self.ack_due = false; // a deadline of an earlier turn on the thread was forgotten with its token
        self.watched = true;
    }

    /// One readiness event ([`ReceiveSession::pump`]) against the current routes.
    pub fn pump(
        &mut self,
        index_of: impl Fn(&str) -> u32,
        flush: bool,
    ) -> Result<(Read, Vec<Event>), SocketError> {
        let delivered = self.session.counts().delivered;
        let routes = Arc::clone(&self.routes);
        let table = routes.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let result = self
            .session
            .pump(self.sock, &table, index_of, &mut self.target, flush);
        drop(table);
        if self.session.counts().delivered != delivered {
            self.batches += 1;
        }
        if let Ok((Read::Data(_), _)) = result {
            self.last_data = Some(Instant::now());
        }
        if flush && result.is_ok() {
            self.note_output();
        }
        result
    }

    /// Writes what output the socket takes; returns the bytes still waiting.
    pub fn flush(&mut self) -> Result<usize, SocketError> {
        let unsent = self.session.flush(self.sock)?;
        self.note_output();
        Ok(unsent)
    }

    fn note_output(&mut self) {
        if self.session.unsent() == 0 {
            let counts = self.session.connection().counts();
            self.acked_out = counts.acked;
            self.bytes_acked_out = counts.frame_bytes;
        }
    }

    /// Whether the payload taken since the last ack written reached `ack_bytes`.
    fn ack_now(&self) -> bool {
        let taken = self.session.connection().counts().frame_bytes;
        taken.saturating_sub(self.bytes_acked_out) >= self.ack_bytes
    }

    /// The deferred output written now; the step that follows (a socket that would not take it all, or
    /// failed, hands the session back).
    fn write_acks(&mut self) -> Step {
        match self.flush() {
            Ok(0) => Step::Idle,
            Ok(_) => self.park(Ok((Read::WouldBlock, Vec::new()))),
            Err(err) => self.park(Err(err)),
        }
    }

    /// Frames whose ack the kernel has taken: the count of the last ack written whole.
    pub fn acked_out(&self) -> u64 {
        self.acked_out
    }

    /// When the last bytes were read.
    pub fn last_data(&self) -> Option<Instant> {
        self.last_data
    }

    /// Everything counted so far.
    pub fn tally(&self) -> ReceiveTally {
        let conn = self.session.connection().counts();
        ReceiveTally {
            frames: conn.frames,
            frame_bytes: conn.frame_bytes,
            inbound: *self.session.counts(),
            batches: self.batches,
        }
    }

    /// What was counted since the last call.
    pub fn take_counts(&mut self) -> ReceiveTally {
        let now = self.tally();
        let added = now.since(&self.taken);
        self.taken = now;
        added
    }

    /// What the thread met when it parked the session (None: it was not parked, or this was taken).
    pub fn take_parked(&mut self) -> Option<Parked> {
        self.parked.take()
    }

    fn park(&mut self, why: Parked) -> Step {
        self.parked = Some(why);
        self.watched = false;
        Step::Park
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// On the data plane's thread: reads are pumped with the acks deferred by `ack_delay` (so that the reply a
/// delivered packet provokes leaves first, and the acks of the reads meanwhile go as one write); anything
/// but data (a lifecycle event, the end, a reset, an error, a TUN gone, output the socket would not take)
/// parks the session for Python.
impl<T: TunWrite + Send> Source for Mutex<Driven<T>> {
    fn fd(&self) -> RawFd {
        lock(self).sock
    }

    fn readable(&self) -> Step {
        let mut s = lock(self);
        if !s.watched {
            return Step::Idle;
        }
        let index = s.index;
        let result = s.pump(|_| index, false);
        let steady = match &result {
            Ok((read, events)) => {
                events.is_empty()
                    && matches!(read, Read::Data(_) | Read::WouldBlock)
                    && s.session.counts().fatal_errno == 0
            }
            Err(_) => false,
        };
        if !steady {
            return s.park(result);
        }
        if s.session.unsent() == 0 {
            return Step::Idle;
        }
        if s.ack_now() {
            return s.write_acks();
        }
        if !s.ack_due {
            s.ack_due = true;
            return Step::Due(s.ack_delay);
        }
        Step::Idle
    }

    fn due(&self) -> Step {
        let mut s = lock(self);
        s.ack_due = false;
        if !s.watched {
            return Step::Idle;
        }
        s.write_acks()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn recv_and_send_tell_data_eof_and_would_block_apart() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(recv(b.as_raw_fd(), &mut buf), Ok(Read::WouldBlock));
        assert_eq!(send(a.as_raw_fd(), b"hello"), Ok(5));
        assert_eq!(recv(b.as_raw_fd(), &mut buf), Ok(Read::Data(5)));
        assert_eq!(&buf[..5], b"hello");
        drop(a);
        assert_eq!(recv(b.as_raw_fd(), &mut buf), Ok(Read::Eof));
        assert_eq!(send(b.as_raw_fd(), b"x"), Err(SocketError(libc::EPIPE)));
    }

    #[test]
    fn a_full_socket_takes_part_and_the_rest_waits() {
        let (a, _b) = UnixStream::pair().unwrap();
        let big = vec![7u8; 8 << 20];
        let written = send(a.as_raw_fd(), &big).unwrap();
        assert!(written > 0 && written < big.len());
    }
}
