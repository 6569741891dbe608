//! Capture-file reading (pcap and pcapng) for `vpn-packet inspect`: the `CaptureReader` class.
//!
//! The file is opened and read in Rust, streamed through `vpn_packet_core::capture::CaptureReader` (its
//! own read buffer makes a `BufReader` redundant), and handed to Python one batch at a time as
//! `(bytes, list[int])`, the shape `extract_batch_from_buffer` takes. Reading releases the GIL.

use std::fs::File;
use std::path::PathBuf;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use vpn_packet_core::capture::{self, Batch, ReaderOptions};

use crate::errors::{capture_error, no_panic, os_error};

/// Streams the IP packets of a pcap or pcapng file in batches.
///
/// Iterating yields `(buffer, lengths)`: the packets laid end to end and their lengths. Frames that carry no
/// IP packet are skipped and counted. A capture that ends with an error (truncated, corrupt) yields the
/// packets before the error, then raises `CaptureError`; the iterator is exhausted afterwards.
#[pyclass(module = "vpn_packet._native", name = "CaptureReader")]
pub struct CaptureReader {
    reader: capture::CaptureReader<File>,
    batch: Batch,
    path: PathBuf,
    batches: u64,
}

#[pymethods]
impl CaptureReader {
    /// Opens `path` and reads its file header (errors here: `CaptureError`, or `OSError` from opening).
    #[new]
    #[pyo3(signature = (path, batch_size = 1024, batch_bytes = 4_194_304))]
    fn new(py: Python<'_>, path: PathBuf, batch_size: usize, batch_bytes: usize) -> PyResult<Self> {
        if batch_size == 0 || batch_bytes == 0 {
            return Err(PyValueError::new_err(
                "batch_size and batch_bytes must be at least 1",
            ));
        }
        no_panic(|| {
            let options = ReaderOptions {
                batch_packets: batch_size,
                batch_bytes,
                ..ReaderOptions::default()
            };
            let opened = py.detach(|| {
                let file = File::open(&path).map_err(Err)?;
                capture::CaptureReader::with_options(file, options).map_err(Ok)
            });
            let reader = opened.map_err(|err| match err {
                Err(io) => os_error(io, &path),
                Ok(err) => capture_error(err, &path),
            })?;
            Ok(CaptureReader {
                reader,
                batch: Batch::default(),
                path,
                batches: 0,
            })
        })
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(
        &mut self,
        py: Python<'py>,
    ) -> PyResult<Option<(Bound<'py, PyBytes>, Bound<'py, PyList>)>> {
        no_panic(|| {
            let CaptureReader {
                reader,
                batch,
                path,
                batches,
            } = self;
            let more = py
                .detach(|| reader.next_batch(batch))
                .map_err(|err| capture_error(err, path))?;
            if !more {
                return Ok(None);
            }
            *batches += 1;
            Ok(Some((
                PyBytes::new(py, &batch.data),
                PyList::new(py, &batch.lengths)?,
            )))
        })
    }

    /// The path given to the constructor.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// `"pcap"` or `"pcapng"`.
    #[getter]
    fn format(&self) -> &'static str {
        self.reader.format().name()
    }

    /// The format with its details, e.g. `"pcap (big-endian, nanosecond)"`.
    #[getter]
    fn format_detail(&self) -> String {
        self.reader.format().to_string()
    }

    /// Packet records read so far (pcap records; pcapng enhanced and simple packet blocks).
    #[getter]
    fn frames(&self) -> u64 {
        self.reader.stats().frames
    }

    /// Frames that carried an IP packet (all handed out in batches).
    #[getter]
    fn ip_packets(&self) -> u64 {
        self.reader.stats().ip_packets
    }

    /// Bytes of those IP packets, as captured.
    #[getter]
    fn ip_bytes(&self) -> u64 {
        self.reader.stats().ip_bytes
    }

    /// Frames of a supported link type carrying something other than IP (ARP, LLDP, ...).
    #[getter]
    fn non_ip_frames(&self) -> u64 {
        self.reader.stats().non_ip_frames
    }

    /// Frames too short for their own link-layer header.
    #[getter]
    fn short_frames(&self) -> u64 {
        self.reader.stats().short_frames
    }

    /// Frames of an unsupported link type, or of a pcapng interface never described.
    #[getter]
    fn unsupported_link_frames(&self) -> u64 {
        self.reader.stats().unsupported_link_frames
    }

    /// Frames per link type (`LINKTYPE_*` number), for the link types seen so far.
    #[getter]
    fn link_types<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (link, frames) in &self.reader.stats().link_types {
            out.set_item(link, frames)?;
        }
        Ok(out)
    }

    /// Batches yielded so far.
    #[getter]
    fn batches(&self) -> u64 {
        self.batches
    }

    /// Bytes of the file consumed so far (the offset of the next record).
    #[getter]
    fn position(&self) -> u64 {
        self.reader.position()
    }

    fn __repr__(&self) -> String {
        format!(
            "CaptureReader({:?}, format={:?}, frames={}, ip_packets={})",
            self.path.display().to_string(),
            self.reader.format().name(),
            self.reader.stats().frames,
            self.reader.stats().ip_packets
        )
    }
}

/// The name of a link type (`LINKTYPE_*` number) this reader supports, or `None`.
#[pyfunction]
pub fn link_type_name(link: u32) -> Option<&'static str> {
    u16::try_from(link).ok().and_then(capture::linktype::name)
}

/// Adds the capture classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<CaptureReader>()?;
    m.add_function(wrap_pyfunction!(link_type_name, m)?)?;
    Ok(())
}
