//! The system calls of a TUN descriptor: batch reads into one buffer, one packet per `write` (or `writev`
//! with a virtio_net_hdr), and the one list of errors after which the descriptor cannot work again.
//!
//! Why here and not in the binding: the binding (`rust/python/src/tun_io.rs`) only converts between Python
//! and these functions, so every rule of how a TUN is read and written (what `EAGAIN`, `ENOBUFS` or `EIO`
//! mean, that `EINTR` is retried, where a batch stops) has one home and is tested without an interpreter.
//! The descriptor stays owned by the caller (Python opens and closes it); nothing here closes it.
//!
//! The functions work on any descriptor that keeps message boundaries (a TUN, or a `SOCK_SEQPACKET`
//! socket standing in for one in tests).

use std::os::fd::RawFd;

use crate::inbound::{TunWrite, WriteOutcome};

/// Errors after which the descriptor cannot work again: the device was deleted (`EBADFD`, `EIO`, `ENXIO`,
/// `ENODEV`), or the descriptor is closed or bad (`EBADF`, `EFAULT`).
pub const FATAL_ERRNOS: [i32; 6] = [
    libc::EBADF,
    libc::EBADFD,
    libc::EIO,
    libc::ENXIO,
    libc::ENODEV,
    libc::EFAULT,
];

/// Whether `errno` is one of [`FATAL_ERRNOS`].
pub fn is_fatal(errno: i32) -> bool {
    FATAL_ERRNOS.contains(&errno)
}

/// The errno of the last failed system call.
fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Writes one packet to `fd`, preceded by `header` in the same `writev` when given (a TUN opened with
/// `IFF_VNET_HDR` takes a virtio_net_hdr before every packet). `EINTR` is retried; no room (`EAGAIN`,
/// `ENOBUFS`, `ENOMEM`) is [`WriteOutcome::Dropped`], as a full device queue drops; a packet the kernel
/// refuses is [`WriteOutcome::Refused`]; a gone device is [`WriteOutcome::Fatal`].
pub fn write_packet(fd: RawFd, header: Option<&[u8]>, packet: &[u8]) -> WriteOutcome {
    loop {
        let n = match header {
            None => {
                // SAFETY: `packet` is a valid slice for the duration of the call; write only reads it.
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
        match last_errno() {
            libc::EINTR => continue,
            libc::EAGAIN | libc::ENOBUFS | libc::ENOMEM => return WriteOutcome::Dropped,
            e if is_fatal(e) => return WriteOutcome::Fatal(e),
            _ => return WriteOutcome::Refused,
        }
    }
}

/// A TUN descriptor as the receive path's [`TunWrite`].
#[derive(Debug, Clone, Copy)]
pub struct FdTun(pub RawFd);

impl TunWrite for FdTun {
    fn write_packet(&mut self, vnet_header: Option<&[u8]>, packet: &[u8]) -> WriteOutcome {
        write_packet(self.0, vnet_header, packet)
    }
}

/// What one [`read_batch`] got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadResult {
    /// Bytes read into the buffer (the packets back to back).
    pub total: usize,
    /// The errno of the error that stopped the read (0: none; `EAGAIN` is not an error).
    pub errno: i32,
}

/// Reads packets from non-blocking `fd` until `EAGAIN`, `max_packets` or about `max_bytes` (each at least
/// 1), one `read` of at most `packet_size` bytes per packet, back to back into `buffer`, which holds exactly
/// the bytes read afterwards (`result.total`); each packet's length is pushed to `lengths` (both cleared
/// first). `EINTR` is retried; an end of file (0) ends the batch.
///
/// The kernel reads into the buffer's spare capacity (reserved once, `max_bytes + packet_size`): nothing is
/// zero-filled, so a page of it is first touched when a packet lands in it. Zero-filling the 4 MiB a node
/// reserves cost about 2 ms of page faults on its first read, which the first packet through the tunnel
/// waited for (the "first ping" of `benches/tunnel.py`).
pub fn read_batch(
    fd: RawFd,
    buffer: &mut Vec<u8>,
    lengths: &mut Vec<u32>,
    packet_size: usize,
    max_packets: usize,
    max_bytes: usize,
) -> ReadResult {
    let (max_packets, max_bytes, size) = (max_packets.max(1), max_bytes.max(1), packet_size.max(1));
    buffer.clear();
    buffer.reserve(max_bytes + size);
    lengths.clear();
    let mut result = ReadResult::default();
    while lengths.len() < max_packets && result.total < max_bytes {
        // SAFETY: `total < max_bytes`, so `total + size <= capacity`: the read stays inside the allocation.
        // The kernel writes the bytes; none is read before it has.
        let n = unsafe { libc::read(fd, buffer.as_mut_ptr().add(result.total).cast(), size) };
        if n > 0 {
            lengths.push(n as u32);
            result.total += n as usize;
            continue;
        }
        if n == 0 {
            break;
        }
        match last_errno() {
            libc::EINTR => continue,
            libc::EAGAIN => break,
            e => {
                result.errno = e;
                break;
            }
        }
    }
    // SAFETY: the first `total` bytes were written by the reads above, and `total <= capacity`.
    unsafe { buffer.set_len(result.total) };
    result
}

/// What one [`write_batch`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteBatch {
    /// Packets the kernel took, and their bytes (without virtio headers).
    pub written: u64,
    pub bytes: u64,
    /// Packets the kernel refused (`EINVAL`, ...); the next one was tried.
    pub refused: u64,
    /// Packets not written because the device had no room (`EAGAIN`, `ENOBUFS`: the batch stopped at the
    /// first and the rest were not tried: a full queue stays full for the rest of a batch) or was gone.
    pub dropped: u64,
    /// The errno of a write that found the device gone (0: none).
    pub fatal_errno: i32,
}

/// Writes `packets` to `fd` in order, each preceded by `header` when given; stops at the first packet the
/// device has no room for or at a fatal error, counting the rest as dropped.
pub fn write_batch<'a>(
    fd: RawFd,
    header: Option<&[u8]>,
    packets: impl ExactSizeIterator<Item = &'a [u8]>,
) -> WriteBatch {
    let mut out = WriteBatch::default();
    let total = packets.len() as u64;
    for (index, packet) in packets.enumerate() {
        match write_packet(fd, header, packet) {
            WriteOutcome::Written => {
                out.written += 1;
                out.bytes += packet.len() as u64;
            }
            WriteOutcome::Refused => out.refused += 1,
            WriteOutcome::Dropped => {
                out.dropped = total - index as u64;
                return out;
            }
            WriteOutcome::Fatal(errno) => {
                out.fatal_errno = errno;
                out.dropped = total - index as u64;
                return out;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `SOCK_SEQPACKET` pair: `.0` plays our TUN descriptor (non-blocking), `.1` the kernel's side.
    struct Pair(RawFd, RawFd);

    impl Pair {
        fn new() -> Self {
            let mut fds = [0; 2];
            // SAFETY: `fds` has room for the two descriptors socketpair writes.
            let rc = unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                    fds.as_mut_ptr(),
                )
            };
            assert_eq!(rc, 0);
            Pair(fds[0], fds[1])
        }

        fn send(&self, packet: &[u8]) {
            // SAFETY: a valid slice.
            let n = unsafe { libc::write(self.1, packet.as_ptr().cast(), packet.len()) };
            assert_eq!(n, packet.len() as isize);
        }

        fn recv(&self) -> Option<Vec<u8>> {
            let mut buf = vec![0u8; 70_000];
            // SAFETY: a valid buffer of that size.
            let n = unsafe { libc::read(self.1, buf.as_mut_ptr().cast(), buf.len()) };
            (n >= 0).then(|| {
                buf.truncate(n as usize);
                buf
            })
        }
    }

    impl Drop for Pair {
        fn drop(&mut self) {
            // SAFETY: both descriptors are ours and closed once.
            unsafe {
                libc::close(self.0);
                libc::close(self.1);
            }
        }
    }

    #[test]
    fn a_batch_read_keeps_packet_boundaries_and_stops_at_eagain_or_a_bound() {
        let pair = Pair::new();
        for i in 0..5u8 {
            pair.send(&vec![i; 10 + i as usize]);
        }
        let (mut buffer, mut lengths) = (Vec::new(), Vec::new());
        let r = read_batch(pair.0, &mut buffer, &mut lengths, 100, 3, 1 << 20);
        assert_eq!((r.total, r.errno, lengths.clone()), (33, 0, vec![10, 11, 12]));
        assert_eq!(buffer.len(), 33, "the buffer holds exactly what was read");
        assert_eq!((&buffer[..10], &buffer[10..21]), (&[0u8; 10][..], &[1u8; 11][..]));
        let r = read_batch(pair.0, &mut buffer, &mut lengths, 100, 100, 1 << 20);
        assert_eq!((r.total, r.errno, lengths.clone()), (27, 0, vec![13, 14]));
        let r = read_batch(pair.0, &mut buffer, &mut lengths, 100, 100, 1 << 20);
        assert_eq!((r, lengths.len()), (ReadResult::default(), 0));
    }

    #[test]
    fn a_read_on_a_closed_descriptor_reports_a_fatal_errno() {
        let (mut buffer, mut lengths) = (Vec::new(), Vec::new());
        let r = read_batch(-1, &mut buffer, &mut lengths, 100, 10, 1000);
        assert_eq!(r.errno, libc::EBADF);
        assert!(is_fatal(r.errno));
    }

    #[test]
    fn writes_keep_order_add_the_header_and_count_what_had_no_room() {
        let pair = Pair::new();
        let packets: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 20]).collect();
        let header = [7u8; 10];
        let w = write_batch(pair.0, Some(&header), packets.iter().map(Vec::as_slice));
        assert_eq!((w.written, w.bytes, w.dropped, w.fatal_errno), (3, 60, 0, 0));
        for i in 0..3u8 {
            let got = pair.recv().unwrap();
            assert_eq!(&got[..10], &header);
            assert_eq!(&got[10..], &[i; 20][..]);
        }
        // Fill the peer's receive queue: the batch stops at the first packet without room.
        let big = vec![0u8; 60_000];
        let many: Vec<&[u8]> = (0..10_000).map(|_| &big[..]).collect();
        let w = write_batch(pair.0, None, many.into_iter());
        assert!(w.written > 0 && w.dropped > 0, "{w:?}");
        assert_eq!(w.written + w.dropped, 10_000);
        let w = write_batch(-1, None, [&b"x"[..], b"y"].into_iter());
        assert_eq!((w.written, w.dropped, w.fatal_errno), (0, 2, libc::EBADF));
    }
}
