//! A bounded cache of destination-key and address strings, keyed by the parsed destination.
//!
//! A VPN sends to the same destinations batch after batch. Reusing one `str` per destination saves formatting
//! and two allocations per group in `group_by_destination`, and the dispatcher's dict lookups get a `str`
//! whose hash is already computed. The cache is cleared when full, so it holds at most `CAPACITY` entries
//! (a few MiB) whatever the traffic.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use foldhash::fast::RandomState;
use pyo3::prelude::*;
use pyo3::types::PyString;
use vpn_packet_core::key::addr_text;
use vpn_packet_core::Destination;

const CAPACITY: usize = 16_384;

type Entry = (Py<PyString>, Py<PyString>);

static CACHE: Mutex<Option<HashMap<Destination, Entry, RandomState>>> = Mutex::new(None);

/// The destination key and the address text of `dest`, as shared `str` objects.
pub fn key_and_ip<'py>(py: Python<'py>, dest: &Destination) -> (Bound<'py, PyString>, Bound<'py, PyString>) {
    // The lock is only ever held by code holding the GIL and never across Python calls; a poisoned lock
    // (a panic while held) leaves a usable map, so take it anyway.
    let mut guard = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    let map = guard.get_or_insert_with(HashMap::default);
    if let Some((key, ip)) = map.get(dest) {
        return (key.bind(py).clone(), ip.bind(py).clone());
    }
    let key = PyString::new(py, dest.key_text().as_str());
    let ip = PyString::new(py, addr_text(dest.addr).as_str());
    if map.len() >= CAPACITY {
        map.clear();
    }
    map.insert(*dest, (key.clone().unbind(), ip.clone().unbind()));
    (key, ip)
}
