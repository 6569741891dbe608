//! Capture-file reading (pcap and pcapng) for `vpn-packet inspect`.

use pyo3::prelude::*;

/// Adds the capture classes to the module.
pub fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
