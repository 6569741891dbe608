//! Capture-file reading (pcap and pcapng, either one gzip-compressed) for `vpn-packet inspect`: the
//! `CaptureReader` class.
//!
//! The file (or standard input, for the path `-`) is opened and read in Rust, streamed through
//! `vpn_packet_core::capture::CaptureReader` (its own read buffer makes a `BufReader` redundant), and handed
//! to Python one batch at a time as `(bytes, list[int])`, the shape `extract_batch_from_buffer` takes.
//! Reading releases the GIL.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use vpn_packet_core::capture::{self, Batch, ReaderOptions};
use vpn_packet_core::{extract, tally_by_destination, Destination, Tally};

use crate::errors::{capture_error, no_panic, os_error};

/// The path that means standard input, as for most command-line tools.
const STDIN_PATH: &str = "-";
/// How standard input is named in messages.
const STDIN_LABEL: &str = "<stdin>";

/// Where the capture's bytes come from.
enum Input {
    File(File),
    Stdin(io::Stdin),
}

impl Read for Input {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Input::File(file) => file.read(buf),
            Input::Stdin(stdin) => stdin.read(buf),
        }
    }
}

/// Streams the IP packets of a pcap or pcapng file in batches.
///
/// Iterating yields `(buffer, lengths)`: the packets laid end to end and their lengths. Frames that carry no
/// IP packet are skipped and counted. A capture that ends with an error (truncated, corrupt) yields the
/// packets before the error, then raises `CaptureError`; the iterator is exhausted afterwards. The path `-`
/// reads standard input; a gzip-compressed capture is decompressed as it is read.
#[pyclass(module = "vpn_packet._native", name = "CaptureReader")]
pub struct CaptureReader {
    reader: capture::CaptureReader<Input>,
    batch: Batch,
    path: PathBuf,
    /// The path as messages name it (`<stdin>` for standard input).
    label: PathBuf,
    batches: u64,
}

#[pymethods]
impl CaptureReader {
    /// Opens `path` (`-`: standard input) and reads its file header (errors here: `CaptureError`, or
    /// `OSError` from opening).
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
            let stdin = path.as_os_str() == STDIN_PATH;
            let label = if stdin {
                PathBuf::from(STDIN_LABEL)
            } else {
                path.clone()
            };
            let opened = py.detach(|| {
                let input = if stdin {
                    Input::Stdin(io::stdin())
                } else {
                    Input::File(File::open(&path).map_err(Err)?)
                };
                capture::CaptureReader::with_options(input, options).map_err(Ok)
            });
            let reader = opened.map_err(|err| match err {
                Err(io) => os_error(io, &label),
                Ok(err) => capture_error(err, &label),
            })?;
            Ok(CaptureReader {
                reader,
                batch: Batch::default(),
                path,
                label,
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
                label,
                batches,
                ..
            } = self;
            let more = py
                .detach(|| reader.next_batch(batch))
                .map_err(|err| capture_error(err, label))?;
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

    /// The next batch, parsed and tallied per destination natively: `(by_destination, error_counts)` as
    /// `PacketBatch.by_destination()` and `PacketBatch.error_counts()` give them, or `None` after the last
    /// batch. Errors as for iteration. What `summarize_capture` uses: the packets never become Python
    /// objects (neither the batch's bytes nor its lengths), which is most of `vpn-packet inspect`'s time
    /// otherwise.
    fn next_tally<'py>(
        &mut self,
        py: Python<'py>,
    ) -> PyResult<Option<(Bound<'py, PyDict>, Bound<'py, PyDict>)>> {
        no_panic(|| {
            let CaptureReader {
                reader,
                batch,
                label,
                batches,
                ..
            } = self;
            let tallied = py.detach(|| {
                if !reader.next_batch(batch)? {
                    return Ok(None);
                }
                let mut errors: BTreeMap<&'static str, usize> = BTreeMap::new();
                let parsed = batch.packets().filter_map(|packet| match extract(packet) {
                    Ok(summary) => Some((summary, packet.len())),
                    Err(err) => {
                        *errors.entry(err.reason()).or_default() += 1;
                        None
                    }
                });
                let tallies: Vec<(Destination, Tally)> = tally_by_destination(parsed);
                Ok(Some((tallies, errors)))
            });
            let Some((tallies, errors)) = tallied.map_err(|err| capture_error(err, label))? else {
                return Ok(None);
            };
            *batches += 1;
            let by_destination = PyDict::new(py);
            for (dest, tally) in tallies {
                let per_protocol = PyDict::new(py);
                for (protocol, packets) in tally.protocols {
                    per_protocol.set_item(protocol, packets)?;
                }
                by_destination.set_item(
                    dest.key_text().as_str(),
                    (tally.packets, tally.bytes, per_protocol),
                )?;
            }
            let error_counts = PyDict::new(py);
            for (reason, count) in errors {
                error_counts.set_item(reason, count)?;
            }
            Ok(Some((by_destination, error_counts)))
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

    /// The format with its details, e.g. `"pcap (big-endian, nanosecond)"`, and `", gzip-compressed"`.
    #[getter]
    fn format_detail(&self) -> String {
        match self.reader.compression() {
            Some(compression) => format!("{}, {compression}-compressed", self.reader.format()),
            None => self.reader.format().to_string(),
        }
    }

    /// `"gzip"` for a gzip-compressed capture (byte offsets then count decompressed bytes), else `None`.
    #[getter]
    fn compression(&self) -> Option<&'static str> {
        self.reader.compression()
    }

    /// How messages name the input: the path, or `<stdin>`.
    #[getter]
    fn name(&self) -> String {
        self.label.display().to_string()
    }

    /// Packet records read so far (pcap records; pcapng enhanced, simple and obsolete packet blocks).
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

    /// Frames per encapsulation crossed (`"vlan"`, `"mpls"`, `"pppoe"`, ...), all link types together; a
    /// frame counts once for each encapsulation in it.
    #[getter]
    fn encapsulations<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let mut totals: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (&(_, encapsulation), frames) in &self.reader.stats().encapsulations {
            *totals.entry(encapsulation.name()).or_default() += frames;
        }
        totals.into_pyobject(py)
    }

    /// Frames per encapsulation, per link type: `{link type: {encapsulation: frames}}`.
    #[getter]
    fn link_encapsulations<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let mut per_link: BTreeMap<u16, BTreeMap<&'static str, u64>> = BTreeMap::new();
        for (&(link, encapsulation), &frames) in &self.reader.stats().encapsulations {
            per_link
                .entry(link)
                .or_default()
                .insert(encapsulation.name(), frames);
        }
        per_link.into_pyobject(py)
    }

    /// pcapng blocks this reader does not decode, per block type number (name resolution 4, interface
    /// statistics 5, custom 0xbad, ...).
    #[getter]
    fn undecoded_blocks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (kind, blocks) in &self.reader.stats().undecoded_blocks {
            out.set_item(kind, blocks)?;
        }
        Ok(out)
    }

    /// Batches yielded so far.
    #[getter]
    fn batches(&self) -> u64 {
        self.batches
    }

    /// Bytes of the (decompressed) input consumed so far (the offset of the next record).
    #[getter]
    fn position(&self) -> u64 {
        self.reader.position()
    }

    fn __repr__(&self) -> String {
        format!(
            "CaptureReader({:?}, format={:?}, frames={}, ip_packets={})",
            self.label.display().to_string(),
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

/// The name of a pcapng block type in the pcapng specification (`"Name Resolution"`, ...), or `None`.
#[pyfunction]
pub fn pcapng_block_name(kind: u32) -> Option<&'static str> {
    capture::block_type::name(kind)
}

/// Adds the capture classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<CaptureReader>()?;
    m.add_function(wrap_pyfunction!(link_type_name, m)?)?;
    m.add_function(wrap_pyfunction!(pcapng_block_name, m)?)?;
    Ok(())
}
