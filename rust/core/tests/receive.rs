//! The native receive path over real sockets: a client `Connection` on one end, a `ReceiveSession` pumped
//! once per readiness event on the other (TLS, hello, frames, source check, packets out, acks back).

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;

use common::{ipv4_from, key_file};
use vpn_packet_core::connection::{Connection, Event, Stage};
use vpn_packet_core::inbound::PacketList;
use vpn_packet_core::prefix::{parse_prefix, PrefixTable};
use vpn_packet_core::receive::{Read, ReceiveSession};
use vpn_packet_core::tls::Security;

fn table() -> PrefixTable<u32> {
    let mut t = PrefixTable::new();
    let (a, l) = parse_prefix("10.1.0.0/16").unwrap();
    t.insert(a, l, 0).unwrap();
    let (a, l) = parse_prefix("10.2.0.0/16").unwrap();
    t.insert(a, l, 1).unwrap();
    t
}

fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    server.set_nonblocking(true).unwrap();
    (client, server)
}

/// node-a dials node-b; returns the client, its socket, node-b's session and socket, established.
fn established() -> (Connection, TcpStream, ReceiveSession, TcpStream) {
    let (a, b) = (key_file("node-a"), key_file("node-b"));
    let sec_a = Security::with_keys("node-a", &a.pem, [("node-b", &b.public[..])]).unwrap();
    let sec_b = Security::with_keys("node-b", &b.pem, [("node-a", &a.public[..])]).unwrap();
    let mut client = Connection::client(&sec_a, "node-b", 1).unwrap();
    let mut session = ReceiveSession::new(Connection::server(&sec_b, None).unwrap(), 65535, false, 65536);
    let (mut client_sock, server_sock) = tcp_pair();
    client_sock.set_nonblocking(true).unwrap();
    let mut list = PacketList::default();
    let mut server_events = Vec::new();
    for _ in 0..1000 {
        let out = client.take_output();
        if !out.is_empty() {
            client_sock.set_nonblocking(false).unwrap();
            client_sock.write_all(&out).unwrap();
            client_sock.set_nonblocking(true).unwrap();
        }
        let (_, events) = session
            .pump(server_sock.as_raw_fd(), &table(), |_| 0, &mut list, true)
            .unwrap();
        server_events.extend(events);
        let mut buf = vec![0; 65536];
        if let Ok(Read::Data(n)) = vpn_packet_core::receive::recv(client_sock.as_raw_fd(), &mut buf) {
            client.receive(&buf[..n], |_, _| {});
        }
        if client.stage() == Stage::Established && !server_events.is_empty() {
            break;
        }
    }
    assert!(matches!(&server_events[..], [Event::Established { peer_id, .. }] if peer_id == "node-a"));
    (client, client_sock, session, server_sock)
}

#[test]
fn frames_are_checked_delivered_and_acknowledged_in_one_pump_per_read() {
    let (mut client, client_sock, mut session, server_sock) = established();
    let good: Vec<Vec<u8>> = (0..5).map(|i| ipv4_from([10, 1, 0, 7], i)).collect();
    let spoofed = ipv4_from([10, 2, 0, 7], 9); // another peer's address
    let mut packets = good.clone();
    packets.insert(2, spoofed);
    assert_eq!(client.send_packets(packets.iter().map(Vec::as_slice)), Ok(6));
    let out = client.take_output();
    (&client_sock).write_all(&out).unwrap();
    let mut list = PacketList::default();
    let mut buf = vec![0; 65536];
    while session.connection().counts().frames < 6 {
        session
            .pump(server_sock.as_raw_fd(), &table(), |_| 0, &mut list, true)
            .unwrap();
    }
    assert_eq!(list.iter().map(<[u8]>::to_vec).collect::<Vec<_>>(), good);
    assert_eq!((session.counts().delivered, session.counts().spoofed), (5, 1));
    while client.counts().acked < 6 {
        if let Ok(Read::Data(n)) = vpn_packet_core::receive::recv(client_sock.as_raw_fd(), &mut buf) {
            client.receive(&buf[..n], |_, _| {});
        }
    }
    assert_eq!(client.in_flight(), 0);
}

#[test]
fn bytes_behind_a_reset_are_discarded_unread() {
    let (mut client, client_sock, mut session, server_sock) = established();
    let packets: Vec<Vec<u8>> = (0..3).map(|i| ipv4_from([10, 1, 0, 7], i)).collect();
    client.send_packets(packets.iter().map(Vec::as_slice)).unwrap();
    (&client_sock).write_all(&client.take_output()).unwrap();
    // The sender gives up and resets (SO_LINGER 0): what it sent is counted lost on its side.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a live `linger` of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            client_sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    drop(client_sock);
    let mut list = PacketList::default();
    let mut read = Read::WouldBlock;
    for _ in 0..1000 {
        read = session
            .pump(server_sock.as_raw_fd(), &table(), |_| 0, &mut list, true)
            .map(|(read, _)| read)
            .unwrap_or(Read::Eof);
        if read != Read::WouldBlock {
            break;
        }
        std::thread::yield_now();
    }
    assert!(matches!(read, Read::Reset { unread } if unread > 0), "{read:?}");
    assert_eq!(session.counts().delivered, 0);
}
