//! The Python face of [`vpn_packet_core::data_plane`]: `DataPlane`, the thread that pumps a node's
//! authenticated receive sessions on its TUN path without the interpreter. Conversions and bookkeeping of
//! the callbacks only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use vpn_packet_core::data_plane::{DataPlane as CorePlane, Source};

use crate::errors::no_panic;
use crate::receive::{ReceiveSession, Target};
use crate::send::{SendSession, SendSource};
use crate::tun_io::TunFeed;

/// A thread that drives receive sessions (`watch`) until they meet something for Python, then hands them
/// back: `notify_fd` becomes readable and `take_parked` gives the `on_parked` callbacks of the sessions
/// handed back, which the caller runs on its loop (they call `ReceiveSession.take_parked`). `ack_delay`
/// (seconds): how long the thread holds a read's ack, unless `ack_bytes` of payload came since the last
/// (see `tuning.ACK_DELAY`, `tuning.ACK_BYTES`). `close()` stops the
/// thread (it is also stopped when the object goes).
#[pyclass(module = "vpn_packet._native", name = "DataPlane")]
pub struct DataPlane {
    inner: Option<CorePlane>,
    ack_delay: Duration,
    ack_bytes: u64,
    /// Per token: the source's Python object (whose token a hand-back clears) and its `on_parked`.
    callbacks: HashMap<u64, (Owner, Py<PyAny>)>,
}

/// The Python object of a source on the thread.
enum Owner {
    Receive(Py<ReceiveSession>),
    Tun(Py<TunFeed>),
    Send(Py<SendSession>),
}

impl DataPlane {
    fn plane(&self) -> PyResult<&CorePlane> {
        self.inner
            .as_ref()
            .ok_or_else(|| PyRuntimeError::new_err("the data plane is closed"))
    }

    /// Drives `source` (marked watched by the caller, who unmarks it on an error); its token.
    fn enter(&mut self, source: Arc<dyn Source>, owner: Owner, on_parked: Py<PyAny>) -> PyResult<u64> {
        let token = self
            .plane()?
            .watch(source)
            .map_err(|err| PyOSError::new_err(err.to_string()))?;
        self.callbacks.insert(token, (owner, on_parked));
        Ok(token)
    }

    /// Forgets `token` (its source unmarked by the caller first: a late event finds it so).
    fn leave(&mut self, token: Option<u64>) {
        if let Some(token) = token {
            self.callbacks.remove(&token);
            if let Some(plane) = &self.inner {
                plane.unwatch(token);
            }
        }
    }
}

#[pymethods]
impl DataPlane {
    #[new]
    #[pyo3(signature = (*, ack_delay = 0.002, ack_bytes = 262144))]
    fn new(ack_delay: f64, ack_bytes: u64) -> PyResult<Self> {
        no_panic(|| {
            if !(0.0..=1.0).contains(&ack_delay) {
                return Err(PyValueError::new_err(format!(
                    "ack_delay must be 0..=1 seconds, got {ack_delay}"
                )));
            }
            let inner = CorePlane::start().map_err(|e| PyOSError::new_err(e.to_string()))?;
            Ok(DataPlane {
                inner: Some(inner),
                ack_delay: Duration::from_secs_f64(ack_delay),
                ack_bytes: ack_bytes.max(1),
                callbacks: HashMap::new(),
            })
        })
    }

    /// Drives `session` (an authenticated session writing to a TUN, not driven by anyone else) from now
    /// on; `index`: its peer's value in the routing table; `on_parked()` is what `take_parked` gives when
    /// the thread hands it back. Raises `ValueError` for a session of the library path or one watched
    /// already, `OSError` when its socket cannot be watched.
    fn watch(
        &mut self,
        session: &Bound<'_, ReceiveSession>,
        index: u32,
        on_parked: Py<PyAny>,
    ) -> PyResult<()> {
        no_panic(|| {
            let owner = Owner::Receive(session.clone().unbind());
            let mut session = session.borrow_mut();
            if session.token.is_some() {
                return Err(PyValueError::new_err("the session is on the data plane already"));
            }
            {
                let mut s = session.shared.lock().unwrap_or_else(|p| p.into_inner());
                if !matches!(s.target, Target::Tun(_)) {
                    return Err(PyValueError::new_err(
                        "only a session that writes a TUN runs on the data plane",
                    ));
                }
                s.hand_over(index, self.ack_delay, self.ack_bytes);
            }
            let source: Arc<dyn Source> = session.shared.clone();
            match self.enter(source, owner, on_parked) {
                Ok(token) => session.token = Some(token),
                Err(err) => {
                    session.shared.lock().unwrap_or_else(|p| p.into_inner()).watched = false;
                    return Err(err);
                }
            }
            Ok(())
        })
    }

    /// Takes `session` back (no call of the thread touches it after this returns); a session not watched is
    /// fine. What the thread may have parked meanwhile is dropped with its callback: the caller is taking
    /// it back for its own reason (the connection ends).
    fn unwatch(&mut self, session: &Bound<'_, ReceiveSession>) {
        let mut session = session.borrow_mut();
        session.shared.lock().unwrap_or_else(|p| p.into_inner()).watched = false;
        self.leave(session.token.take());
    }

    /// Reads `feed`'s TUN on the thread from now on (see `TunFeed`); `on_parked()` is what `take_parked`
    /// gives when the thread hands it back. Raises `ValueError` for a feed watched already, `OSError` when
    /// its descriptor cannot be watched.
    fn watch_tun(&mut self, py: Python<'_>, feed: &Bound<'_, TunFeed>, on_parked: Py<PyAny>) -> PyResult<()> {
        no_panic(|| {
            let owner = Owner::Tun(feed.clone().unbind());
            let mut feed = feed.borrow_mut();
            if feed.token.is_some() {
                return Err(PyValueError::new_err("the feed is on the data plane already"));
            }
            feed.set_watched(py, true);
            let source: Arc<dyn Source> = feed.shared.clone();
            match self.enter(source, owner, on_parked) {
                Ok(token) => feed.token = Some(token),
                Err(err) => {
                    feed.set_watched(py, false);
                    return Err(err);
                }
            }
            Ok(())
        })
    }

    /// Takes `feed` back (no call of the thread touches it after this returns, what it held stays for
    /// `TunFeed.take_parked`); a feed not watched is fine.
    fn unwatch_tun(&mut self, py: Python<'_>, feed: &Bound<'_, TunFeed>) {
        let mut feed = feed.borrow_mut();
        feed.set_watched(py, false);
        self.leave(feed.token.take());
    }

    /// Reads `session`'s acks on the thread from now on (see `SendSource`: the caller has none of its own
    /// batches waiting for acks); `on_parked()` is what `take_parked` gives when the thread hands it back.
    /// Raises `ValueError` for a session watched already, `OSError` when its socket cannot be watched.
    fn watch_send(&mut self, session: &Bound<'_, SendSession>, on_parked: Py<PyAny>) -> PyResult<()> {
        no_panic(|| {
            let owner = Owner::Send(session.clone().unbind());
            let mut session = session.borrow_mut();
            if session.token.is_some() {
                return Err(PyValueError::new_err("the session is on the data plane already"));
            }
            session.set_watched(true);
            let source: Arc<dyn Source> = Arc::new(SendSource(session.shared()));
            match self.enter(source, owner, on_parked) {
                Ok(token) => session.token = Some(token),
                Err(err) => {
                    session.set_watched(false);
                    return Err(err);
                }
            }
            Ok(())
        })
    }

    /// Takes `session`'s ack reads back (no call of the thread touches it after this returns); a session
    /// not watched is fine.
    fn unwatch_send(&mut self, session: &Bound<'_, SendSession>) {
        let mut session = session.borrow_mut();
        session.set_watched(false);
        self.leave(session.token.take());
    }

    /// The `on_parked` callbacks of the sessions handed back since the last call (their sessions are no
    /// longer watched: call `ReceiveSession.take_parked`, then `watch` again to hand one back).
    fn take_parked(&mut self, py: Python<'_>) -> Vec<Py<PyAny>> {
        let Some(plane) = &self.inner else {
            return Vec::new();
        };
        let tokens = plane.take_parked();
        tokens
            .into_iter()
            .filter_map(|token| self.callbacks.remove(&token))
            .map(|(owner, callback)| {
                // Handed back: no longer on the thread (it can be watched again).
                match owner {
                    Owner::Receive(session) => {
                        if let Ok(mut session) = session.try_borrow_mut(py) {
                            session.token = None;
                        }
                    }
                    Owner::Tun(feed) => {
                        if let Ok(mut feed) = feed.try_borrow_mut(py) {
                            feed.token = None;
                        }
                    }
                    Owner::Send(session) => {
                        if let Ok(mut session) = session.try_borrow_mut(py) {
                            session.token = None;
                        }
                    }
                }
                callback
            })
            .collect()
    }

    /// Readable when sessions were handed back (for the event loop to watch).
    #[getter]
    fn notify_fd(&self) -> PyResult<i32> {
        Ok(self.plane()?.notify_fd())
    }

    /// `(watched, events, parks)`: sessions driven now, readiness events handled on the thread, sessions
    /// handed back.
    fn stats(&self) -> (usize, u64, u64) {
        self.inner.as_ref().map_or((0, 0, 0), |plane| {
            let s = plane.stats();
            (s.watched, s.events, s.parks)
        })
    }

    /// Stops the thread (waiting for the call in progress, if any). Idempotent; the sessions still watched
    /// are forgotten, not parked.
    fn close(&mut self, py: Python<'_>) {
        if let Some(mut plane) = self.inner.take() {
            py.detach(|| plane.stop());
        }
        self.callbacks.clear();
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_none()
    }

    fn __repr__(&self) -> String {
        let (watched, events, parks) = self.stats();
        format!("<DataPlane watched={watched} events={events} parks={parks}>")
    }
}

/// Registers `DataPlane`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<DataPlane>()?;
    Ok(())
}
