//! `PacketBatch`: a parsed batch kept in Rust, materialised into Python objects only on demand.
//!
//! `extract_batch` allocates one `PacketInfo` per packet (most of its cost). A `PacketBatch` parses every
//! packet into a compact native vector instead; indexing makes a `PacketInfo` (or `PacketError`) for one
//! item, and the column accessors (`destination_keys`, `protocols`, ...) build one list each.

use std::collections::HashMap;

use pyo3::exceptions::PyIndexError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use vpn_packet_core::{extract, split_by_lengths, tally_by_destination, PacketSummary, ParseError};

use crate::buffer::PacketBytes;
use crate::errors::{no_panic, parse_error_value, split_error};
use crate::functions::{for_each_item, result_object};

/// One parsed packet: its summary or why it has none, and its size in bytes.
struct Item {
    result: Result<PacketSummary, ParseError>,
    size: usize,
}

/// Parsed packets of one batch, in order.
#[pyclass(frozen, sequence, module = "vpn_packet._native", name = "PacketBatch")]
pub struct PacketBatch {
    items: Vec<Item>,
}

impl PacketBatch {
    fn from_slices<'a>(packets: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let items = packets
            .into_iter()
            .map(|p| Item {
                result: extract(p),
                size: p.len(),
            })
            .collect();
        PacketBatch { items }
    }
}

#[pymethods]
impl PacketBatch {
    fn __len__(&self) -> usize {
        self.items.len()
    }

    /// The `PacketInfo` of item `index`, or its `PacketError` (returned, not raised).
    fn __getitem__<'py>(&self, py: Python<'py>, index: isize) -> PyResult<Bound<'py, PyAny>> {
        let len = self.items.len() as isize;
        let position = if index < 0 { index + len } else { index };
        if !(0..len).contains(&position) {
            return Err(PyIndexError::new_err(format!(
                "batch index {index} out of range for {len} packets"
            )));
        }
        result_object(py, &self.items[position as usize].result)
    }

    /// Number of packets that parsed.
    #[getter]
    fn valid_count(&self) -> usize {
        self.items.iter().filter(|i| i.result.is_ok()).count()
    }

    /// Number of packets that did not parse.
    #[getter]
    fn error_count(&self) -> usize {
        self.items.iter().filter(|i| i.result.is_err()).count()
    }

    /// Total size of all packets, in bytes.
    #[getter]
    fn total_bytes(&self) -> usize {
        self.items.iter().map(|i| i.size).sum()
    }

    /// Every item as a list (the same as `extract_batch` would have returned).
    fn to_list<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let objects = self
            .items
            .iter()
            .map(|i| result_object(py, &i.result))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, objects)
    }

    /// `(index, PacketError)` for every packet that did not parse.
    fn errors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for (index, item) in self.items.iter().enumerate() {
            if let Err(err) = &item.result {
                out.append((index, parse_error_value(py, err)))?;
            }
        }
        Ok(out)
    }

    /// How many packets failed, by `PacketError.reason`.
    fn error_counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let mut counts: HashMap<&'static str, usize> = HashMap::new();
        for item in &self.items {
            if let Err(err) = &item.result {
                *counts.entry(err.reason()).or_default() += 1;
            }
        }
        let out = PyDict::new(py);
        for (reason, count) in counts {
            out.set_item(reason, count)?;
        }
        Ok(out)
    }

    /// The destination key of each packet, `None` where it did not parse.
    fn destination_keys<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let keys = self.items.iter().map(|item| {
            item.result
                .as_ref()
                .ok()
                .map(|s| PyString::new(py, s.destination().key_text().as_str()))
        });
        PyList::new(py, keys)
    }

    /// The protocol of each packet, `None` where it did not parse.
    fn protocols<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(
            py,
            self.items
                .iter()
                .map(|i| i.result.as_ref().ok().map(|s| s.protocol)),
        )
    }

    /// The size in bytes of each packet.
    fn sizes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.items.iter().map(|i| i.size))
    }

    /// Per destination key: `(packets, bytes, {protocol: packets})`, in order of first appearance.
    fn by_destination<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let parsed = self
            .items
            .iter()
            .filter_map(|i| i.result.as_ref().ok().map(|s| (*s, i.size)));
        let out = PyDict::new(py);
        for (dest, tally) in tally_by_destination(parsed) {
            let per_protocol = PyDict::new(py);
            for (protocol, packets) in tally.protocols {
                per_protocol.set_item(protocol, packets)?;
            }
            out.set_item(
                dest.key_text().as_str(),
                (tally.packets, tally.bytes, per_protocol),
            )?;
        }
        Ok(out)
    }

    fn __repr__(&self) -> String {
        format!(
            "<PacketBatch {} packets, {} malformed>",
            self.items.len(),
            self.error_count()
        )
    }
}

/// Parses many packets into a `PacketBatch` in one call.
#[pyfunction]
pub fn parse_batch(packets: &Bound<'_, PyAny>) -> PyResult<PacketBatch> {
    no_panic(|| {
        let mut held = Vec::new();
        for_each_item(packets, |item| {
            held.push(PacketBytes::get(item)?);
            Ok(())
        })?;
        Ok(PacketBatch::from_slices(held.iter().map(PacketBytes::as_slice)))
    })
}

/// Parses packets laid end to end in one buffer, with their lengths, into a `PacketBatch`.
#[pyfunction]
pub fn parse_batch_from_buffer(buffer: &Bound<'_, PyAny>, lengths: Vec<usize>) -> PyResult<PacketBatch> {
    no_panic(|| {
        let held = PacketBytes::get(buffer)?;
        let packets = split_by_lengths(held.as_slice(), &lengths).map_err(|e| split_error(&e))?;
        Ok(PacketBatch::from_slices(packets))
    })
}
