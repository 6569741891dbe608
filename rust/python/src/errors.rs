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

// --- capture (owned by capture reader) ---

pyo3::import_exception!(vpn_packet.errors, CaptureError);

/// A `CaptureError(message, kind, offset)` for a capture that cannot be read (further), or the `OSError`
/// behind an I/O failure. The message starts with the path.
pub fn capture_error(err: vpn_packet_core::capture::CaptureError, path: &std::path::Path) -> PyErr {
    match err {
        vpn_packet_core::capture::CaptureError::Io(io) => os_error(io, path),
        err => CaptureError::new_err((format!("{}: {err}", path.display()), err.kind(), err.offset())),
    }
}

/// The `OSError` subclass of an I/O error (`FileNotFoundError`, `PermissionError`, `IsADirectoryError`, ...),
/// with `errno`, `strerror` and `filename` set: `OSError(errno, strerror, filename)` picks the subclass.
pub fn os_error(err: std::io::Error, path: &std::path::Path) -> PyErr {
    match err.raw_os_error() {
        Some(code) => {
            let text = err.to_string();
            let strerror = text
                .strip_suffix(&format!(" (os error {code})"))
                .unwrap_or(&text)
                .to_owned();
            pyo3::exceptions::PyOSError::new_err((code, strerror, path.as_os_str().to_os_string()))
        }
        None => PyErr::from(err),
    }
}

// --- framing (owned by transport receiving side) ---

pyo3::import_exception!(vpn_packet.errors, FramingError);

/// A `FramingError(message, reason, length, frames)`: `frames` are the packets decoded before the bad
/// length prefix (a `list[bytes]`, or `None` when not decoding).
pub fn framing_error(
    py: Python<'_>,
    err: &vpn_packet_core::framing::FramingError,
    frames: Option<Bound<'_, pyo3::types::PyList>>,
) -> PyErr {
    let frames = frames.map_or_else(|| py.None(), |f| f.into_any().unbind());
    FramingError::new_err((err.to_string(), err.reason(), err.length(), frames))
}

/// A `FramingError(message, reason)` for bytes that are not a valid handshake message.
pub fn handshake_error(err: &vpn_packet_core::handshake::HandshakeError) -> PyErr {
    FramingError::new_err((err.to_string(), err.reason()))
}

/// A `FramingError(message, reason)` for bytes that are not a valid stream of ack records.
pub fn ack_error(err: &vpn_packet_core::ack::AckError) -> PyErr {
    FramingError::new_err((err.to_string(), err.reason()))
}
