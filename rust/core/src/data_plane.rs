//! The data plane's own thread: one `epoll` loop that drives the established connections' receive path
//! without the Python interpreter (issue 20, item 3: "on an established flow no asyncio task wakes up").
//!
//! Python keeps the lifecycle. It hands a [`Source`] over with [`DataPlane::watch`] once the source is in
//! its steady state (a connection authenticated, on the TUN path); from then on this thread calls
//! [`Source::readable`] on every readiness event of its descriptor, and [`Source::due`] at the deadline a
//! source asked for (the deferred acks: [`Step::Due`]). When a source meets anything that is not steady
//! work (an event of its connection's lifecycle, an error, the end of the stream, output the socket would
//! not take) it answers [`Step::Park`]: the thread forgets it (no more calls) and tells Python through an
//! eventfd ([`DataPlane::notify_fd`], which the asyncio loop watches); Python takes the parked tokens
//! ([`DataPlane::take_parked`]), handles what the source kept for it, and may watch it again.
//!
//! Ownership: a source is either watched (only this thread drives it) or not (only Python does). A source
//! keeps that flag under its own lock, so [`DataPlane::unwatch`] from Python, racing an event already taken
//! from `epoll`, is safe: the source answers the late event with [`Step::Idle`] and does nothing. The thread
//! never takes the interpreter's lock (GIL); Python may take a source's lock while holding it, the thread
//! never holds a source's lock while waiting for anything else.
//!
//! Why a thread and not the asyncio loop: each readiness callback on the loop costs an iteration of the
//! loop and interpreter work, four times per round trip of a ping (see `benches/README.md`). Here a
//! readiness event costs the system calls and the work.

use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a source wants after a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing more now: wait for the next readiness event.
    Idle,
    /// Call [`Source::due`] after this long (unless a call is due already), and wait for readiness meanwhile.
    Due(Duration),
    /// Stop driving this source and hand it to Python (see the module documentation).
    Park,
    /// Do not watch the descriptor for this long, then call [`Source::readable`] again: a source under a
    /// flood lets its next batch gather (fewer, bigger batches: less work per packet) instead of being
    /// woken for every few packets.
    Pause(Duration),
}

/// A descriptor the data plane drives. Implementations keep their state under their own lock and check
/// there that they are still watched (see the module documentation).
pub trait Source: Send + Sync {
    /// The descriptor watched for readability (level-triggered).
    fn fd(&self) -> RawFd;
    /// The descriptor is readable.
    fn readable(&self) -> Step;
    /// A deadline asked for with [`Step::Due`] came.
    fn due(&self) -> Step;
}

/// Tokens 0 and 1 are the plane's own descriptors.
const WAKE: u64 = 0;
const TIMER: u64 = 1;

struct Shared {
    epoll: OwnedFd,
    /// Written to stop the thread.
    wake: OwnedFd,
    /// Written by the thread when it parks a source: Python's loop watches it.
    notify: OwnedFd,
    timer: OwnedFd,
    sources: Mutex<HashMap<u64, Arc<dyn Source>>>,
    parked: Mutex<Vec<u64>>,
    stop: AtomicBool,
    next_token: AtomicU64,
    /// Readiness events handled and sources parked, for the statistics.
    events: AtomicU64,
    parks: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a panic on the thread, which `catch_unwind` already turned into a park; the
    // data is still consistent enough to go on with (plain maps and vectors).
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned(rc: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: a descriptor just returned by the kernel, owned by no one else.
    check(rc).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain system call.
    owned(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })
}

/// Reads (and so resets) an eventfd or a timerfd; nothing to read is fine.
fn drain(fd: RawFd) {
    let mut value = 0u64;
    // SAFETY: `value` is a live u64, the 8 bytes both descriptors give.
    unsafe { libc::read(fd, (&mut value as *mut u64).cast(), 8) };
}

fn signal(fd: RawFd) {
    let one = 1u64;
    // SAFETY: `one` is a live u64; an eventfd takes 8 bytes. A full counter (EAGAIN) is signalled already.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

fn epoll_add(epoll: RawFd, fd: RawFd, token: u64) -> io::Result<()> {
    let mut event = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: token,
    };
    // SAFETY: `event` is a live epoll_event.
    check(unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event) }).map(drop)
}

fn epoll_del(epoll: RawFd, fd: RawFd) {
    let mut event = libc::epoll_event { events: 0, u64: 0 };
    // SAFETY: as above; an fd not registered (ENOENT) or closed (EBADF) is fine: it is gone either way.
    unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_DEL, fd, &mut event) };
}

/// Arms `timer` to fire once after `after` (zero: at once, as a timerfd takes zero as "disarm").
fn arm(timer: RawFd, after: Duration) {
    let after = after.max(Duration::from_nanos(1));
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: after.as_secs() as libc::time_t,
            tv_nsec: after.subsec_nanos() as libc::c_long,
        },
    };
    // SAFETY: `spec` is a live itimerspec; the old value is not asked for.
    unsafe { libc::timerfd_settime(timer, 0, &spec, std::ptr::null_mut()) };
}

/// The data plane: its thread and the sources it drives. [`DataPlane::stop`] stops the thread and waits
/// for it; dropping the plane only tells it to stop.
pub struct DataPlane {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Counters of a data plane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlaneStats {
    /// Sources being driven now.
    pub watched: usize,
    /// Readiness events handled on the thread.
    pub events: u64,
    /// Sources handed back to Python.
    pub parks: u64,
}

impl DataPlane {
    /// Starts the thread (named `vpn-packet-data`).
    pub fn start() -> io::Result<DataPlane> {
        // SAFETY: plain system calls.
        let epoll = owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        let timer = owned(unsafe {
            libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC)
        })?;
        let (wake, notify) = (eventfd()?, eventfd()?);
        epoll_add(epoll.as_raw_fd(), wake.as_raw_fd(), WAKE)?;
        epoll_add(epoll.as_raw_fd(), timer.as_raw_fd(), TIMER)?;
        let shared = Arc::new(Shared {
            epoll,
            wake,
            notify,
            timer,
            sources: Mutex::new(HashMap::new()),
            parked: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            next_token: AtomicU64::new(TIMER + 1),
            events: AtomicU64::new(0),
            parks: AtomicU64::new(0),
        });
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("vpn-packet-data".into())
            .spawn(move || run(&for_thread))?;
        Ok(DataPlane {
            shared,
            thread: Some(thread),
        })
    }

    /// Drives `source` from now on; returns its token (what [`DataPlane::take_parked`] names it by).
    pub fn watch(&self, source: Arc<dyn Source>) -> io::Result<u64> {
        let token = self.shared.next_token.fetch_add(1, Ordering::Relaxed);
        let fd = source.fd();
        lock(&self.shared.sources).insert(token, source);
        if let Err(err) = epoll_add(self.shared.epoll.as_raw_fd(), fd, token) {
            lock(&self.shared.sources).remove(&token);
            return Err(err);
        }
        Ok(token)
    }

    /// Stops driving `token` (the caller has marked the source unwatched under its own lock first, or does
    /// so now: a late event finds it so). Unknown tokens are fine.
    pub fn unwatch(&self, token: u64) {
        if let Some(source) = lock(&self.shared.sources).remove(&token) {
            epoll_del(self.shared.epoll.as_raw_fd(), source.fd());
        }
    }

    /// The tokens parked since the last call (and resets the notification).
    pub fn take_parked(&self) -> Vec<u64> {
        drain(self.shared.notify.as_raw_fd());
        std::mem::take(&mut *lock(&self.shared.parked))
    }

    /// Readable when sources were parked: the caller's event loop watches it.
    pub fn notify_fd(&self) -> RawFd {
        self.shared.notify.as_raw_fd()
    }

    /// What the plane does now and did so far.
    pub fn stats(&self) -> PlaneStats {
        PlaneStats {
            watched: lock(&self.shared.sources).len(),
            events: self.shared.events.load(Ordering::Relaxed),
            parks: self.shared.parks.load(Ordering::Relaxed),
        }
    }

    /// Stops the thread and waits for it (at most one source call: none of them blocks). Every source is
    /// forgotten, unparked: the caller unwatches its sources first.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        signal(self.shared.wake.as_raw_fd());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        lock(&self.shared.sources).clear();
    }
}

impl Drop for DataPlane {
    /// Tells the thread to stop, without waiting for it: a plane dropped while its thread waits for
    /// something the dropping thread holds (an interpreter's lock, at exit) must not wait forever.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        signal(self.shared.wake.as_raw_fd());
    }
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane").field("stats", &self.stats()).finish()
    }
}

/// One source call, a panic inside it answered as a park (a Rust panic must never take the node down:
/// Python then finds the source's outcome missing and closes the connection).
fn call(source: &dyn Source, due: bool) -> Step {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if due {
            source.due()
        } else {
            source.readable()
        }
    }))
    .unwrap_or(Step::Park)
}

struct Loop<'a> {
    shared: &'a Shared,
    /// (deadline, token), earliest first.
    dues: BinaryHeap<std::cmp::Reverse<(Instant, u64)>>,
    /// The deadline the timer is armed for.
    armed: Option<Instant>,
    /// Sources paused ([`Step::Pause`]): out of `epoll` until their deadline.
    paused: std::collections::HashSet<u64>,
}

impl Loop<'_> {
    fn source(&self, token: u64) -> Option<Arc<dyn Source>> {
        lock(&self.shared.sources).get(&token).cloned()
    }

    fn apply(&mut self, token: u64, source: &dyn Source, step: Step) {
        match step {
            Step::Idle => {}
            Step::Due(after) => self.dues.push(std::cmp::Reverse((Instant::now() + after, token))),
            Step::Pause(after) => {
                epoll_del(self.shared.epoll.as_raw_fd(), source.fd());
                self.paused.insert(token);
                self.dues.push(std::cmp::Reverse((Instant::now() + after, token)));
            }
            Step::Park => {
                if lock(&self.shared.sources).remove(&token).is_some() {
                    epoll_del(self.shared.epoll.as_raw_fd(), source.fd());
                }
                let mut parked = lock(&self.shared.parked);
                parked.push(token);
                if parked.len() == 1 {
                    signal(self.shared.notify.as_raw_fd());
                }
                self.shared.parks.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn run_dues(&mut self) {
        let now = Instant::now();
        while let Some(std::cmp::Reverse((when, token))) = self.dues.peek().copied() {
            if when > now {
                break;
            }
            self.dues.pop();
            let paused = self.paused.remove(&token);
            if let Some(source) = self.source(token) {
                if paused {
                    // Watched again (unless it went meanwhile: then the map no longer has it), and read.
                    if epoll_add(self.shared.epoll.as_raw_fd(), source.fd(), token).is_err() {
                        continue;
                    }
                }
                let step = call(&*source, !paused);
                self.apply(token, &*source, step);
            }
        }
    }

    fn rearm(&mut self) {
        let next = self.dues.peek().map(|std::cmp::Reverse((when, _))| *when);
        if next != self.armed {
            if let Some(when) = next {
                arm(
                    self.shared.timer.as_raw_fd(),
                    when.saturating_duration_since(Instant::now()),
                );
            }
            self.armed = next;
        }
    }
}

fn run(shared: &Shared) {
    let mut state = Loop {
        shared,
        dues: BinaryHeap::new(),
        armed: None,
        paused: std::collections::HashSet::new(),
    };
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
    while !shared.stop.load(Ordering::Acquire) {
        // SAFETY: `events` is a live buffer of `events.len()` entries.
        let n = unsafe {
            libc::epoll_wait(
                shared.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                -1,
            )
        };
        if n < 0 {
            continue; // EINTR
        }
        for event in &events[..n as usize] {
            match event.u64 {
                WAKE => drain(shared.wake.as_raw_fd()),
                TIMER => {
                    drain(shared.timer.as_raw_fd());
                    state.armed = None;
                }
                token => {
                    if let Some(source) = state.source(token) {
                        shared.events.fetch_add(1, Ordering::Relaxed);
                        let step = call(&*source, false);
                        state.apply(token, &*source, step);
                    }
                }
            }
        }
        state.run_dues();
        state.rearm();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::AtomicUsize;

    /// Reads what comes; parks at "park", asks for a due call at "due".
    struct Echo {
        sock: UnixStream,
        reads: AtomicUsize,
        dues: AtomicUsize,
    }

    impl Source for Echo {
        fn fd(&self) -> RawFd {
            self.sock.as_raw_fd()
        }
        fn readable(&self) -> Step {
            let mut buf = [0u8; 16];
            let n = crate::receive::recv(self.fd(), &mut buf);
            self.reads.fetch_add(1, Ordering::SeqCst);
            match n {
                Ok(crate::receive::Read::Data(n)) if &buf[..n] == b"park" => Step::Park,
                Ok(crate::receive::Read::Data(n)) if &buf[..n] == b"due" => Step::Due(Duration::ZERO),
                Ok(crate::receive::Read::Data(n)) if &buf[..n] == b"pause" => {
                    Step::Pause(Duration::from_millis(1))
                }
                Ok(crate::receive::Read::Eof) => Step::Park,
                _ => Step::Idle,
            }
        }
        fn due(&self) -> Step {
            self.dues.fetch_add(1, Ordering::SeqCst);
            Step::Idle
        }
    }

    /// An `Echo` on one end of a socket pair, and the other end.
    fn echo() -> (Arc<Echo>, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let echo = Arc::new(Echo {
            sock: ours,
            reads: AtomicUsize::new(0),
            dues: AtomicUsize::new(0),
        });
        (echo, theirs)
    }

    /// Polls `done` (bounded): the thread works on its own time.
    fn eventually(done: impl Fn() -> bool) {
        for _ in 0..10_000 {
            if done() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn wait_readable(fd: RawFd) {
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        assert_eq!(unsafe { libc::poll(&mut poll, 1, 10_000) }, 1);
    }

    #[test]
    fn a_source_is_driven_until_it_parks_and_then_python_is_told() {
        let mut plane = DataPlane::start().unwrap();
        let (echo, theirs) = echo();
        let token = plane.watch(echo.clone()).unwrap();
        use std::io::Write;
        (&theirs).write_all(b"due").unwrap();
        // The due call comes on the thread, after the read: waited for by polling its counter.
        eventually(|| echo.dues.load(Ordering::SeqCst) == 1);
        assert_eq!(echo.dues.load(Ordering::SeqCst), 1);
        assert!(plane.take_parked().is_empty());
        (&theirs).write_all(b"park").unwrap();
        wait_readable(plane.notify_fd());
        assert_eq!(plane.take_parked(), vec![token]);
        assert_eq!(plane.stats().watched, 0);
        assert_eq!(plane.stats().parks, 1);
        // Parked: no longer driven, even with data waiting.
        (&theirs).write_all(b"more").unwrap();
        let reads = echo.reads.load(Ordering::SeqCst);
        plane.stop();
        assert_eq!(echo.reads.load(Ordering::SeqCst), reads);
    }

    #[test]
    fn a_paused_source_is_read_again_at_its_deadline_without_new_data() {
        let mut plane = DataPlane::start().unwrap();
        let (echo, theirs) = echo();
        plane.watch(echo.clone()).unwrap();
        use std::io::Write;
        (&theirs).write_all(b"pause").unwrap();
        // The read that paused, then the one at the deadline (which finds nothing: would block).
        eventually(|| echo.reads.load(Ordering::SeqCst) >= 2);
        assert_eq!(echo.reads.load(Ordering::SeqCst), 2);
        assert_eq!(echo.dues.load(Ordering::SeqCst), 0); // read again, not a due call
                                                         // Watched again: new data is read.
        (&theirs).write_all(b"x").unwrap();
        eventually(|| echo.reads.load(Ordering::SeqCst) >= 3);
        assert_eq!(echo.reads.load(Ordering::SeqCst), 3);
        plane.stop();
    }

    #[test]
    fn unwatch_forgets_a_source() {
        let plane = DataPlane::start().unwrap();
        let (echo, _theirs) = echo();
        let token = plane.watch(echo).unwrap();
        assert_eq!(plane.stats().watched, 1);
        plane.unwatch(token);
        plane.unwatch(token);
        assert_eq!(plane.stats().watched, 0);
        assert!(plane.take_parked().is_empty());
    }
}
