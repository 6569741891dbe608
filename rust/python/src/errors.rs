//! The one place where Rust errors become Python exceptions.
//!
//! Exception classes live in `vpn_packet.errors` (pure Python, so that `PacketError` can be both a
//! `VpnPacketError` and a `ValueError`); the native module imports them on first use.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use vpn_packet_core::{ParseError, SplitError};

pyo3::import_exception!(vpn_packet.errors, PacketError);

/// A `PacketError` for a packet that has no trustworthy addresses; `reason` is a stable name for counting.
pub fn parse_error(err: &ParseError) -> PyErr {
    PacketError::new_err((err.to_string(), err.reason()))
}

/// The exception instance itself, for batch results that report errors per item.
pub fn parse_error_value<'py>(py: Python<'py>, err: &ParseError) -> Bound<'py, PyAny> {
    parse_error(err).into_value(py).into_bound(py).into_any()
}

/// A `ValueError` for packet lengths that do not fit their buffer.
pub fn split_error(err: &SplitError) -> PyErr {
    PyValueError::new_err(err.to_string())
}

/// Runs `f`, turning a Rust panic into a `RuntimeError` so that `PanicException` (a `BaseException`)
/// never reaches Python. The core is written not to panic; this is the last line of defence.
#[inline]
pub fn no_panic<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let detail = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(PyRuntimeError::new_err(format!(
            "internal error in vpn_packet native code: {detail}"
        )))
    })
}
