//! Acknowledgements for Python: `encode_ack` and `AckDecoder` (the protocol is `vpn_packet_core::ack`).

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use vpn_packet_core::ack::{self, AckDecoder as CoreDecoder, ACK_LEN};

use crate::buffer::with_bytes;
use crate::errors::{ack_error, no_panic};

/// The ack record for `taken` frames (9 bytes).
#[pyfunction]
pub fn encode_ack(py: Python<'_>, taken: u64) -> PyResult<Bound<'_, PyBytes>> {
    no_panic(|| Ok(PyBytes::new(py, &ack::encode_ack(taken))))
}

/// Reads a receiver's ack records across any read boundaries; `feed` returns the highest count so far.
#[pyclass(module = "vpn_packet._native", name = "AckDecoder")]
#[derive(Default)]
pub struct AckDecoder {
    inner: CoreDecoder,
}

#[pymethods]
impl AckDecoder {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// Feeds received bytes; returns the highest count acknowledged so far. Raises `FramingError`
    /// (`unexpected_message`, `ack_regressed`) for bytes that are not ack records, and again on every call.
    fn feed(&mut self, data: &Bound<'_, PyAny>) -> PyResult<u64> {
        no_panic(|| {
            with_bytes(data, |bytes| {
                self.inner.feed(bytes).map_err(|err| ack_error(&err))
            })?
        })
    }

    /// The highest count acknowledged so far.
    #[getter]
    fn taken(&self) -> u64 {
        self.inner.taken()
    }

    /// Bytes of a partial record held (at most 8).
    #[getter]
    fn buffered(&self) -> usize {
        self.inner.buffered()
    }

    fn __repr__(&self) -> String {
        format!("<AckDecoder taken={}>", self.inner.taken())
    }
}

/// Registers the function, the decoder and `ACK_LEN`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("ACK_LEN", ACK_LEN)?;
    m.add_function(wrap_pyfunction!(encode_ack, m)?)?;
    m.add_class::<AckDecoder>()?;
    Ok(())
}
