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

/// Waits (bounded) for `done`, polling: the data plane's thread works on its own time.
fn eventually(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..10_000 {
        if done() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    false
}

#[test]
fn on_the_data_plane_frames_are_delivered_acks_deferred_and_the_end_handed_back() {
    use std::sync::{Arc, Mutex, RwLock};
    use std::time::Duration;
    use vpn_packet_core::data_plane::{DataPlane, Source};
    use vpn_packet_core::receive::Driven;

    let (mut client, client_sock, session, server_sock) = established();
    let routes = Arc::new(RwLock::new(table()));
    let driven = Arc::new(Mutex::new(Driven::new(
        session,
        PacketList::default(),
        server_sock.as_raw_fd(),
        routes,
    )));
    // A big ack_bytes: the ack waits its delay (a bulk flow's threshold is the next test's).
    driven
        .lock()
        .unwrap()
        .hand_over(0, Duration::from_millis(5), u64::MAX);
    let mut plane = DataPlane::start().unwrap();
    let source: Arc<dyn Source> = driven.clone();
    let token = plane.watch(source).unwrap();

    let good: Vec<Vec<u8>> = (0..20).map(|i| ipv4_from([10, 1, 0, 7], i)).collect();
    client.send_packets(good.iter().map(Vec::as_slice)).unwrap();
    (&client_sock).write_all(&client.take_output()).unwrap();
    assert!(eventually(
        || driven.lock().unwrap().session.counts().delivered == 20
    ));
    // The ack comes, on the thread's timer.
    let mut buf = vec![0; 65536];
    assert!(eventually(|| {
        if let Ok(Read::Data(n)) = vpn_packet_core::receive::recv(client_sock.as_raw_fd(), &mut buf) {
            client.receive(&buf[..n], |_, _| {});
        }
        client.counts().acked == 20
    }));
    {
        let mut d = driven.lock().unwrap();
        assert_eq!(d.target.iter().map(<[u8]>::to_vec).collect::<Vec<_>>(), good);
        assert_eq!(d.acked_out(), 20);
        let counted = d.take_counts();
        assert_eq!((counted.frames, counted.inbound.delivered), (20, 20));
        assert_eq!(d.take_counts().frames, 0); // taken once
        assert!(d.watched);
    }
    // The end of the stream is not steady work: handed back, with what the read met.
    client.close();
    (&client_sock).write_all(&client.take_output()).unwrap();
    client_sock.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(eventually(|| !driven.lock().unwrap().watched));
    let mut parked_tokens = Vec::new();
    assert!(eventually(|| {
        parked_tokens.extend(plane.take_parked());
        !parked_tokens.is_empty()
    }));
    assert_eq!(parked_tokens, vec![token]);
    let parked = driven.lock().unwrap().take_parked().unwrap().unwrap();
    assert!(
        matches!(parked, (Read::Data(_), ref events) if events.contains(&Event::Closed))
            || matches!(parked, (Read::Eof, _))
    );
    plane.stop();
}

#[test]
fn on_the_data_plane_a_bulk_flow_is_acknowledged_at_once_past_ack_bytes() {
    use std::sync::{Arc, Mutex, RwLock};
    use std::time::Duration;
    use vpn_packet_core::data_plane::{DataPlane, Source};
    use vpn_packet_core::receive::Driven;

    let (mut client, client_sock, session, server_sock) = established();
    let driven = Arc::new(Mutex::new(Driven::new(
        session,
        PacketList::default(),
        server_sock.as_raw_fd(),
        Arc::new(RwLock::new(table())),
    )));
    // An hour's delay: only the byte threshold can send this ack.
    driven
        .lock()
        .unwrap()
        .hand_over(0, Duration::from_secs(3600), 1000);
    let mut plane = DataPlane::start().unwrap();
    let source: Arc<dyn Source> = driven.clone();
    plane.watch(source).unwrap();
    let packets: Vec<Vec<u8>> = (0..100).map(|i| ipv4_from([10, 1, 0, 7], i)).collect();
    client.send_packets(packets.iter().map(Vec::as_slice)).unwrap();
    (&client_sock).write_all(&client.take_output()).unwrap();
    let mut buf = vec![0; 65536];
    assert!(eventually(|| {
        if let Ok(Read::Data(n)) = vpn_packet_core::receive::recv(client_sock.as_raw_fd(), &mut buf) {
            client.receive(&buf[..n], |_, _| {});
        }
        client.counts().acked >= 50
    }));
    plane.stop();
}
