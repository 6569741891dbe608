//! Longest-prefix match and the anti-spoofing source filter for Python: `PrefixTable`, `filter_sources`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{RwLockReadGuard, RwLockWriteGuard};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString};
use vpn_packet_core::prefix::{check_source, parse_prefix, PrefixTable as CoreTable, SourceCheck};
use vpn_packet_core::receive::SharedTable;

use crate::buffer::with_bytes;
use crate::errors::no_panic;
use crate::functions::for_each_item;

/// An address from its text or its packed bytes (4 or 16).
fn address(ip: &Bound<'_, PyAny>) -> PyResult<IpAddr> {
    if let Ok(text) = ip.cast::<PyString>() {
        let text = text.to_str()?;
        return text
            .parse()
            .map_err(|_| PyValueError::new_err(format!("not an IP address: {text:?}")));
    }
    let parsed = with_bytes(ip, |bytes| match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))),
        16 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(bytes);
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => None,
    })
    .map_err(|_| PyTypeError::new_err("an IP address is a str or 4 or 16 packed bytes"))?;
    parsed.ok_or_else(|| PyValueError::new_err("a packed IP address is 4 or 16 bytes"))
}

/// A longest-prefix-match table from IPv4/IPv6 prefixes to non-negative integers (peer indexes).
///
/// IPv4 and IPv6 are separate: an IPv4-mapped IPv6 address matches IPv6 prefixes only.
///
/// The table is shared (not copied) with the receive sessions that check sources against it, on the data
/// plane's thread too: a change here (a reload's `StaticPeerDiscovery.update`) applies to them at once.
#[pyclass(module = "vpn_packet._native", name = "PrefixTable")]
#[derive(Default)]
pub struct PrefixTable {
    pub inner: SharedTable,
}

impl PrefixTable {
    fn read(&self) -> RwLockReadGuard<'_, CoreTable<u32>> {
        self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, CoreTable<u32>> {
        self.inner
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[pymethods]
impl PrefixTable {
    #[new]
    fn new() -> Self {
        PrefixTable::default()
    }

    /// Maps `prefix` (`"10.0.0.0/8"`, `"2001:db8::/32"`, or an address: /32, /128) to `value`, returning
    /// the value it replaces. Host bits set raise `ValueError` unless `strict=False`, which clears them.
    #[pyo3(signature = (prefix, value, *, strict = true))]
    fn insert(&mut self, prefix: &str, value: u32, strict: bool) -> PyResult<Option<u32>> {
        no_panic(|| {
            let err = |e: vpn_packet_core::PrefixError| PyValueError::new_err(format!("{prefix}: {e}"));
            let (network, len) = parse_prefix(prefix).map_err(err)?;
            if strict {
                self.write().insert(network, len, value).map_err(err)
            } else {
                self.write().insert_masked(network, len, value).map_err(err)
            }
        })
    }

    /// Removes exactly `prefix`, returning its value (`None` when absent).
    fn remove(&mut self, prefix: &str) -> PyResult<Option<u32>> {
        no_panic(|| {
            let (network, len) = parse_prefix(prefix).map_err(|e| PyValueError::new_err(e.to_string()))?;
            Ok(self.write().remove(network, len))
        })
    }

    /// The value of the longest prefix containing `ip` (text, or 4/16 packed bytes), or `None`.
    fn lookup(&self, ip: &Bound<'_, PyAny>) -> PyResult<Option<u32>> {
        no_panic(|| Ok(self.read().lookup(address(ip)?)))
    }

    /// The prefix length and value of the longest prefix containing `ip`, or `None`.
    fn lookup_prefix(&self, ip: &Bound<'_, PyAny>) -> PyResult<Option<(u8, u32)>> {
        no_panic(|| Ok(self.read().lookup_prefix(address(ip)?)))
    }

    fn __len__(&self) -> usize {
        self.read().len()
    }

    fn __repr__(&self) -> String {
        format!("PrefixTable(<{} prefixes>)", self.read().len())
    }
}

/// Keeps the packets whose source address's longest prefix in `table` maps to `peer`.
///
/// Returns `(accepted, spoofed, unparsable)`: the accepted packet objects themselves (not copies), in order,
/// the number dropped for a source outside the peer's prefixes, and the number without a readable source.
#[pyfunction]
pub fn filter_sources<'py>(
    py: Python<'py>,
    packets: &Bound<'py, PyAny>,
    table: PyRef<'py, PrefixTable>,
    peer: u32,
) -> PyResult<(Bound<'py, PyList>, u64, u64)> {
    no_panic(|| {
        let accepted = PyList::empty(py);
        let table = table.read();
        let (mut spoofed, mut unparsable) = (0u64, 0u64);
        for_each_item(packets, |item| {
            match with_bytes(item, |bytes| check_source(&table, bytes, peer))? {
                SourceCheck::Accepted => accepted.append(item)?,
                SourceCheck::Spoofed => spoofed += 1,
                SourceCheck::Unparsable => unparsable += 1,
            }
            Ok(())
        })?;
        Ok((accepted, spoofed, unparsable))
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PrefixTable>()?;
    m.add_function(wrap_pyfunction!(filter_sources, m)?)?;
    Ok(())
}
