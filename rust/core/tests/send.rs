//! The native send path over real sockets: a `SendSession` (client) on one end, pumped once per readiness
//! event and handed framed batches, a `ReceiveSession` (server) on the other.

mod common;

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use common::{ipv4_from, key_file, KeyFile};
use vpn_packet_core::connection::{Connection, Event, SendError, Stage};
use vpn_packet_core::framing::encode_frames;
use vpn_packet_core::inbound::PacketList;
use vpn_packet_core::ledger::{FastCounters, FastCounts, FastOwner};
use vpn_packet_core::prefix::{parse_prefix, PrefixTable};
use vpn_packet_core::receive::{Read, ReceiveSession};
use vpn_packet_core::send::{NotTaken, SendFailure, SendSession};
use vpn_packet_core::tls::Security;

fn table() -> PrefixTable<u32> {
    let mut t = PrefixTable::new();
    let (a, l) = parse_prefix("10.1.0.0/16").unwrap();
    t.insert(a, l, 0).unwrap();
    t
}

fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    client.set_nonblocking(true).unwrap();
    server.set_nonblocking(true).unwrap();
    (client, server)
}

struct Pair {
    client: SendSession,
    client_sock: TcpStream,
    server: ReceiveSession,
    server_sock: TcpStream,
    list: PacketList,
    client_events: Vec<Event>,
    server_events: Vec<Event>,
    acked: u64,
}

impl Pair {
    /// node-a dials `dialled` with node-a's config (`a_knows` is the key it has for node-b); node-b answers.
    fn new(a_knows: &KeyFile, b: &KeyFile, a: &KeyFile) -> Pair {
        let sec_a = Security::with_keys("node-a", &a.pem, [("node-b", &a_knows.public[..])]).unwrap();
        let sec_b = Security::with_keys("node-b", &b.pem, [("node-a", &a.public[..])]).unwrap();
        let (client_sock, server_sock) = tcp_pair();
        let mut client = SendSession::new(Connection::client(&sec_a, "node-b", 7).unwrap(), 65536);
        assert_eq!(client.flush(client_sock.as_raw_fd()), Ok(0)); // the ClientHello
        let server = ReceiveSession::new(Connection::server(&sec_b, None).unwrap(), 65535, false, 65536);
        Pair {
            client,
            client_sock,
            server,
            server_sock,
            list: PacketList::default(),
            client_events: Vec::new(),
            server_events: Vec::new(),
            acked: 0,
        }
    }

    /// One pump of each side (the client's output flushed first).
    fn turn(&mut self) {
        let _ = self.client.flush(self.client_sock.as_raw_fd());
        let (_, events) = self
            .server
            .pump(
                self.server_sock.as_raw_fd(),
                &table(),
                |_| 0,
                &mut self.list,
                true,
            )
            .unwrap();
        self.server_events.extend(events);
        if let Ok(pumped) = self.client.pump(self.client_sock.as_raw_fd()) {
            self.client_events.extend(pumped.events);
            self.acked = pumped.acked;
        }
    }

    fn until(&mut self, mut done: impl FnMut(&Pair) -> bool) {
        for _ in 0..10_000 {
            if done(self) {
                return;
            }
            self.turn();
            std::thread::yield_now();
        }
        panic!(
            "no progress: client {:?}, server {:?}",
            self.client_events, self.server_events
        );
    }
}

fn established() -> Pair {
    let (a, b) = (key_file("node-a"), key_file("node-b"));
    let mut pair = Pair::new(&b, &b, &a);
    pair.until(|p| !p.client_events.is_empty() && !p.server_events.is_empty());
    assert!(
        matches!(&pair.client_events[..], [Event::Established { peer_id, announced_id, epoch: 7 }]
            if peer_id == "node-b" && announced_id == "node-b"),
        "{:?}",
        pair.client_events
    );
    assert_eq!(pair.client.connection().stage(), Stage::Established);
    pair
}

#[test]
fn framed_batches_are_sent_in_the_call_and_acknowledged_through_pump() {
    let mut pair = established();
    let packets: Vec<Vec<u8>> = (0..10).map(|i| ipv4_from([10, 1, 0, 7], i)).collect();
    let fd = pair.client_sock.as_raw_fd();
    for chunk in packets.chunks(5) {
        let wire = encode_frames(chunk.iter().map(Vec::as_slice), 65535).unwrap();
        assert_eq!(pair.client.send_framed(fd, &wire, 5), Ok(0)); // an idle socket takes it all
    }
    assert_eq!(pair.client.connection().counts().frames, 10);
    pair.until(|p| p.acked == 10);
    assert_eq!(pair.list.iter().map(<[u8]>::to_vec).collect::<Vec<_>>(), packets);
    assert_eq!(pair.client.connection().in_flight(), 0);
    // A keepalive is a frame of length 0: counted as a keepalive by both sides, not acknowledged.
    assert_eq!(pair.client.send_keepalive(fd), Ok(0));
    pair.until(|p| p.server.connection().counts().keepalives == 1);
    assert_eq!(pair.client.connection().counts().frames, 10);
}

fn owner() -> FastOwner {
    FastOwner {
        destination: Arc::new(FastCounters::default()),
        total: Arc::new(FastCounters::default()),
    }
}

#[test]
fn the_fast_path_takes_batches_only_within_the_window_and_counts_them_when_acknowledged() {
    let mut pair = established();
    let fd = pair.client_sock.as_raw_fd();
    let fast = owner();
    let packets: Vec<Vec<u8>> = (0..9).map(|i| ipv4_from([10, 1, 0, 7], i)).collect();
    let wire = |range: std::ops::Range<usize>| {
        encode_frames(packets[range].iter().map(Vec::as_slice), 65535).unwrap()
    };
    let (first, second, third) = (wire(0..3), wire(3..6), wire(6..9));
    // A worker's batch, then the fast path's: one connection, one count of frames.
    assert_eq!(pair.client.send_framed(fd, &first, 3), Ok(0));
    let window = (first.len() + second.len()) as u64;
    assert_eq!(pair.client.send_fast(fd, &second, 3, window, fast.clone()), Ok(0));
    // The window is full now: nothing taken, the batch is the worker's to write after acks.
    assert_eq!(
        pair.client.send_fast(fd, &third, 3, window, fast.clone()),
        Err(NotTaken::WindowFull)
    );
    assert_eq!(fast.destination.counts().in_flight, 3);
    assert_eq!(pair.client.ledger().fast_in_flight(), 3);
    pair.until(|p| p.acked == 6);
    let sent_bytes = (second.len() - 4 * 3) as u64;
    let settled = FastCounts {
        in_flight: 0,
        sent: 3,
        sent_bytes,
        lost: 0,
    };
    assert_eq!(
        (fast.destination.counts(), fast.total.counts()),
        (settled, settled)
    );
    assert_eq!(pair.client.ledger().wire_in_flight(), 0);
    assert_eq!(pair.client.send_fast(fd, &third, 3, window, fast.clone()), Ok(0));
    pair.until(|p| p.acked == 9);
    assert_eq!(pair.list.iter().map(<[u8]>::to_vec).collect::<Vec<_>>(), packets);
    assert_eq!(fast.destination.counts().sent, 6);
    assert_eq!(pair.client.fail_in_flight(), 0, "nothing left in flight");
}

#[test]
fn the_fast_path_takes_nothing_before_the_answer_or_on_a_forgotten_socket_and_counts_what_was_lost() {
    let (a, b) = (key_file("node-a"), key_file("node-b"));
    let mut pair = Pair::new(&b, &b, &a);
    let fd = pair.client_sock.as_raw_fd();
    let fast = owner();
    let wire = encode_frames([&ipv4_from([10, 1, 0, 7], 1)[..]], 65535).unwrap();
    assert_eq!(
        pair.client.send_fast(fd, &wire, 1, 1 << 20, fast.clone()),
        Err(NotTaken::NotEstablished)
    );
    pair.until(|p| p.client.connection().stage() == Stage::Established);
    assert_eq!(pair.client.send_fast(fd, &wire, 1, 1 << 20, fast.clone()), Ok(0));
    // The connection ends before the peer acknowledges: the batch is lost, counted once.
    assert_eq!(pair.client.fail_in_flight(), 1);
    assert_eq!(pair.client.fail_in_flight(), 0);
    let c = fast.destination.counts();
    assert_eq!((c.in_flight, c.sent, c.lost), (0, 0, 1));
    assert_eq!(
        pair.client.send_fast(-1, &wire, 1, 1 << 20, fast.clone()),
        Err(NotTaken::NotEstablished),
        "a forgotten socket takes nothing"
    );
}

#[test]
fn bytes_that_are_not_whole_counted_frames_are_refused_and_nothing_is_taken() {
    let mut pair = established();
    let fd = pair.client_sock.as_raw_fd();
    let wire = encode_frames([&ipv4_from([10, 1, 0, 7], 1)[..]], 65535).unwrap();
    let refused = |r| match r {
        Err(SendFailure::Refused(err)) => err,
        other => panic!("{other:?}"),
    };
    let err = refused(pair.client.send_framed(fd, &wire[..wire.len() - 1], 1));
    assert_eq!(
        (err, err.reason()),
        (SendError::Unframed { at: 0, error: None }, "truncated")
    );
    assert_eq!(
        refused(pair.client.send_framed(fd, &wire, 2)).reason(),
        "miscounted"
    );
    let mut too_long = wire.clone();
    too_long[..4].copy_from_slice(&70_000u32.to_be_bytes());
    assert_eq!(
        refused(pair.client.send_framed(fd, &too_long, 1)).reason(),
        "too_large"
    );
    let mut short_offload = vec![0x80, 0, 0, 5];
    short_offload.extend_from_slice(&[0; 5]);
    assert_eq!(
        refused(pair.client.send_framed(fd, &short_offload, 1)).reason(),
        "short_offload"
    );
    assert_eq!(pair.client.connection().counts().frames, 0);
    assert_eq!(pair.client.unsent(), 0);
    // The connection is untouched: the good batch still goes through.
    assert_eq!(pair.client.send_framed(fd, &wire, 1), Ok(0));
    pair.until(|p| p.acked == 1);
}

#[test]
fn before_the_answer_nothing_is_taken() {
    let (a, b) = (key_file("node-a"), key_file("node-b"));
    let mut pair = Pair::new(&b, &b, &a);
    let wire = encode_frames([&ipv4_from([10, 1, 0, 7], 1)[..]], 65535).unwrap();
    let fd = pair.client_sock.as_raw_fd();
    assert_eq!(
        pair.client.send_framed(fd, &wire, 1),
        Err(SendFailure::Refused(SendError::NotEstablished))
    );
    pair.until(|p| !p.client_events.is_empty());
}

#[test]
fn a_server_with_another_key_fails_the_dial_by_reason() {
    let (a, b, x) = (key_file("node-a"), key_file("node-b"), key_file("node-x"));
    let mut pair = Pair::new(&b, &x, &a); // node-a expects b's key; node-x answers
    pair.until(|p| !p.client_events.is_empty());
    match &pair.client_events[..] {
        [Event::Failed(failure)] => assert_eq!(failure.reason(), "key_mismatch"),
        other => panic!("{other:?}"),
    }
    assert_eq!(pair.client.connection().stage(), Stage::Closed);
}

#[test]
fn a_peer_that_stops_reading_leaves_the_rest_unsent_here_and_flush_writes_it_later() {
    let mut pair = established();
    let fd = pair.client_sock.as_raw_fd();
    let packet = vec![0x45u8; 1400];
    let batch = encode_frames(std::iter::repeat_n(&packet[..], 64), 65535).unwrap();
    let mut sent = 0u64;
    let mut unsent = 0;
    // node-b does not pump: the socket buffers fill, and the rest waits in the session.
    while unsent == 0 {
        unsent = pair.client.send_framed(fd, &batch, 64).unwrap();
        sent += 64;
        assert!(sent < 1_000_000, "the socket never filled");
    }
    assert_eq!(pair.client.unsent(), unsent);
    // node-b reads again: flushing and pumping deliver every frame, then the acks cover them.
    pair.until(|p| p.acked == sent);
    assert_eq!(pair.client.unsent(), 0);
    assert_eq!(pair.server.connection().counts().frames, sent);
}

#[test]
fn the_server_closing_ends_the_session_with_an_event() {
    let mut pair = established();
    pair.server.connection_mut().close();
    pair.server.flush(pair.server_sock.as_raw_fd()).unwrap();
    drop(std::mem::replace(&mut pair.server_sock, tcp_pair().1));
    let mut read = Read::WouldBlock;
    for _ in 0..10_000 {
        let pumped = pair.client.pump(pair.client_sock.as_raw_fd()).unwrap();
        pair.client_events.extend(pumped.events);
        read = pumped.read;
        if read == Read::Eof {
            break;
        }
        std::thread::yield_now();
    }
    assert_eq!(read, Read::Eof);
    assert!(
        pair.client_events.contains(&Event::Closed),
        "{:?}",
        pair.client_events
    );
    assert_eq!(pair.client.connection().stage(), Stage::Closed);
}
