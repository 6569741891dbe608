//! Module-level functions: single and batch extraction, destination keys, grouping by destination.

use pyo3::prelude::*;
use pyo3::types::{PyList, PyString, PyTuple};
use vpn_packet_core::{
    destination, extract, group_by_destination as group_core, split_by_lengths, PacketSummary, ParseError,
};

use crate::buffer::{with_bytes, PacketBytes};
use crate::errors::{no_panic, parse_error, parse_error_value, split_error};
use crate::key_cache::key_and_ip;
use crate::packet_info::PacketInfo;

/// Parses one raw IP packet.
#[pyfunction]
pub fn extract_ip_and_ports(py: Python<'_>, packet: &Bound<'_, PyAny>) -> PyResult<Py<PacketInfo>> {
    no_panic(|| {
        let summary = with_bytes(packet, extract)?.map_err(|e| parse_error(&e))?;
        Ok(PacketInfo::new_untracked(py, summary)?.unbind())
    })
}

/// The destination key of a packet, formatted natively.
#[pyfunction]
pub fn destination_key<'py>(py: Python<'py>, packet: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyString>> {
    no_panic(|| {
        let dest = with_bytes(packet, destination)?.map_err(|e| parse_error(&e))?;
        Ok(PyString::new(py, dest.key_text().as_str()))
    })
}

/// The destination key and the destination address text, from one parse (what a dispatcher routes by).
#[pyfunction]
pub fn destination_key_and_ip<'py>(
    py: Python<'py>,
    packet: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyString>, Bound<'py, PyString>)> {
    no_panic(|| {
        let dest = with_bytes(packet, destination)?.map_err(|e| parse_error(&e))?;
        Ok(key_and_ip(py, &dest))
    })
}

/// Calls `f` with every item of a list, tuple or other iterable of packets.
pub fn for_each_item<'py>(
    packets: &Bound<'py, PyAny>,
    mut f: impl FnMut(&Bound<'py, PyAny>) -> PyResult<()>,
) -> PyResult<()> {
    if let Ok(list) = packets.cast::<PyList>() {
        for item in list.iter() {
            f(&item)?;
        }
    } else if let Ok(tuple) = packets.cast::<PyTuple>() {
        for item in tuple.iter() {
            f(&item)?;
        }
    } else {
        for item in packets.try_iter()? {
            f(&item?)?;
        }
    }
    Ok(())
}

/// A parse result as a batch item: a `PacketInfo`, or the `PacketError` instance in its place.
pub fn result_object<'py>(
    py: Python<'py>,
    result: &Result<PacketSummary, ParseError>,
) -> PyResult<Bound<'py, PyAny>> {
    match result {
        Ok(summary) => Ok(PacketInfo::new_untracked(py, *summary)?.into_any()),
        Err(err) => Ok(parse_error_value(py, err)),
    }
}

/// Parses many packets in one call; a bad packet gives its `PacketError` in its place.
#[pyfunction]
pub fn extract_batch<'py>(py: Python<'py>, packets: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
    no_panic(|| {
        let out = PyList::empty(py);
        for_each_item(packets, |item| {
            out.append(with_bytes(item, |bytes| result_object(py, &extract(bytes)))??)
        })?;
        Ok(out)
    })
}

/// Parses packets laid end to end in one buffer, with their lengths (the shape of a batched read).
#[pyfunction]
pub fn extract_batch_from_buffer<'py>(
    py: Python<'py>,
    buffer: &Bound<'py, PyAny>,
    lengths: Vec<usize>,
) -> PyResult<Bound<'py, PyList>> {
    no_panic(|| {
        let held = PacketBytes::get(buffer)?;
        let packets = split_by_lengths(held.as_slice(), &lengths).map_err(|e| split_error(&e))?;
        let items = packets
            .into_iter()
            .map(|p| result_object(py, &extract(p)))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    })
}

/// Groups packets by destination in one call, keeping their order within each destination.
///
/// Returns `(groups, rejected)`: `groups` is a list of `(destination_key, destination_ip, packets)` in order
/// of first appearance, where `packets` holds the very objects passed in; `rejected` is a list of
/// `(index, PacketError)`.
#[pyfunction]
#[allow(clippy::type_complexity)]
pub fn group_by_destination<'py>(
    py: Python<'py>,
    packets: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>)> {
    no_panic(|| {
        let mut objects: Vec<Bound<'py, PyAny>> = Vec::new();
        for_each_item(packets, |item| {
            objects.push(item.clone());
            Ok(())
        })?;
        let held = objects
            .iter()
            .map(PacketBytes::get)
            .collect::<PyResult<Vec<_>>>()?;
        let grouped = group_core(held.iter().map(PacketBytes::as_slice));
        let groups = PyList::empty(py);
        for group in &grouped.groups {
            let members = PyList::new(py, group.members.iter().map(|&i| &objects[i]))?;
            let (key, ip) = key_and_ip(py, &group.destination);
            groups.append((key, ip, members))?;
        }
        let rejected = PyList::empty(py);
        for (index, err) in &grouped.rejected {
            rejected.append((*index, parse_error_value(py, err)))?;
        }
        Ok((groups, rejected))
    })
}
