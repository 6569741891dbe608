//! `PacketInfo`: the frozen, hashable result of `extract_ip_and_ports`.
//!
//! Holds the parsed summary natively; `ipaddress` objects and the key string are made on first access and
//! cached, so a caller who only reads ports pays for neither.

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use pyo3::basic::CompareOp;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyString, PyTuple, PyType};
use vpn_packet_core::key::addr_text;
use vpn_packet_core::PacketSummary;

static IPV4_ADDRESS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static IPV6_ADDRESS: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// An `ipaddress.IPv4Address` or `IPv6Address` for `addr`.
pub fn ip_object(py: Python<'_>, addr: IpAddr) -> PyResult<Py<PyAny>> {
    let object = match addr {
        IpAddr::V4(a) => IPV4_ADDRESS
            .import(py, "ipaddress", "IPv4Address")?
            .call1((u32::from(a),))?,
        IpAddr::V6(a) => IPV6_ADDRESS
            .import(py, "ipaddress", "IPv6Address")?
            .call1((u128::from(a),))?,
    };
    Ok(object.unbind())
}

/// Addresses, ports and protocol of an IP packet.
#[pyclass(frozen, module = "vpn_packet._native", name = "PacketInfo")]
pub struct PacketInfo {
    pub summary: PacketSummary,
    src_ip: PyOnceLock<Py<PyAny>>,
    dst_ip: PyOnceLock<Py<PyAny>>,
    key: PyOnceLock<Py<PyString>>,
}

impl PacketInfo {
    /// Allocates a `PacketInfo`, untracked by the cycle collector.
    ///
    /// PyO3 gives every class GC support, but a `PacketInfo` can only refer to `ipaddress` objects and a
    /// `str`, and the class is final, so it can never be part of a reference cycle. Untracking it spares the
    /// collector a traversal of every result of a large batch (a quarter of the batch cost otherwise).
    #[inline]
    pub fn new_untracked(py: Python<'_>, summary: PacketSummary) -> PyResult<Bound<'_, PacketInfo>> {
        let object = Bound::new(py, PacketInfo::from(summary))?;
        // SAFETY: `object` is a live GC-capable object we own; untracking is allowed for objects that
        // cannot be part of a cycle (see above), and PyO3's dealloc untracks only if tracked.
        unsafe { pyo3::ffi::PyObject_GC_UnTrack(object.as_ptr().cast()) };
        Ok(object)
    }
}

impl From<PacketSummary> for PacketInfo {
    #[inline]
    fn from(summary: PacketSummary) -> Self {
        PacketInfo {
            summary,
            src_ip: PyOnceLock::new(),
            dst_ip: PyOnceLock::new(),
            key: PyOnceLock::new(),
        }
    }
}

/// Reads an address given as text, packed bytes, or an `ipaddress` object.
fn address_from_python(value: &Bound<'_, PyAny>, field: &str) -> PyResult<IpAddr> {
    if let Ok(text) = value.cast::<PyString>() {
        let text = text.to_str()?;
        return text
            .parse()
            .map_err(|_| PyValueError::new_err(format!("{field}: not an IP address: {text:?}")));
    }
    let packed_holder;
    let packed: &[u8] = if let Ok(bytes) = value.cast::<PyBytes>() {
        bytes.as_bytes()
    } else if let Ok(packed) = value.getattr("packed") {
        packed_holder = packed.cast_into::<PyBytes>()?;
        packed_holder.as_bytes()
    } else {
        return Err(PyTypeError::new_err(format!(
            "{field}: expected str, packed bytes or an ipaddress address, got {}",
            value.get_type().name()?
        )));
    };
    if let Ok(octets) = <[u8; 4]>::try_from(packed) {
        Ok(IpAddr::V4(Ipv4Addr::from(octets)))
    } else if let Ok(octets) = <[u8; 16]>::try_from(packed) {
        Ok(IpAddr::V6(Ipv6Addr::from(octets)))
    } else {
        Err(PyValueError::new_err(format!(
            "{field}: packed address must be 4 or 16 bytes, got {}",
            packed.len()
        )))
    }
}

fn optional_int(value: Option<u16>) -> String {
    value.map_or_else(|| "None".to_string(), |v| v.to_string())
}

#[pymethods]
impl PacketInfo {
    /// Builds a `PacketInfo` from its fields (addresses as text, packed bytes or `ipaddress` objects).
    #[new]
    #[pyo3(signature = (version, src_ip, dst_ip, src_port, dst_port, protocol))]
    fn new(
        version: u8,
        src_ip: &Bound<'_, PyAny>,
        dst_ip: &Bound<'_, PyAny>,
        src_port: Option<u16>,
        dst_port: Option<u16>,
        protocol: u8,
    ) -> PyResult<Self> {
        let src = address_from_python(src_ip, "src_ip")?;
        let dst = address_from_python(dst_ip, "dst_ip")?;
        let family = |a: IpAddr| if a.is_ipv4() { 4 } else { 6 };
        if family(src) != version || family(dst) != version {
            return Err(PyValueError::new_err(format!(
                "version {version} does not match addresses {src} (IPv{}) and {dst} (IPv{})",
                family(src),
                family(dst)
            )));
        }
        Ok(PacketSummary {
            src,
            dst,
            src_port,
            dst_port,
            protocol,
        }
        .into())
    }

    /// 4 or 6.
    #[getter]
    fn version(&self) -> u8 {
        self.summary.version()
    }

    /// Source address (`ipaddress.IPv4Address` or `IPv6Address`), made on first access.
    #[getter]
    fn src_ip(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.src_ip
            .get_or_try_init(py, || ip_object(py, self.summary.src))
            .map(|o| o.clone_ref(py))
    }

    /// Destination address (`ipaddress.IPv4Address` or `IPv6Address`), made on first access.
    #[getter]
    fn dst_ip(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.dst_ip
            .get_or_try_init(py, || ip_object(py, self.summary.dst))
            .map(|o| o.clone_ref(py))
    }

    #[getter]
    fn src_port(&self) -> Option<u16> {
        self.summary.src_port
    }

    #[getter]
    fn dst_port(&self) -> Option<u16> {
        self.summary.dst_port
    }

    /// Upper-layer protocol number (for IPv6, after the extension-header walk).
    #[getter]
    fn protocol(&self) -> u8 {
        self.summary.protocol
    }

    /// `10.0.0.1:80`, `[2001:db8::1]:443`, or the bare destination address when there is no port.
    #[getter]
    fn destination_key(&self, py: Python<'_>) -> Py<PyString> {
        self.key
            .get_or_init(py, || {
                PyString::new(py, self.summary.destination().key_text().as_str()).unbind()
            })
            .clone_ref(py)
    }

    fn __repr__(&self) -> String {
        let s = &self.summary;
        format!(
            "PacketInfo(version={}, src_ip='{}', dst_ip='{}', src_port={}, dst_port={}, protocol={})",
            s.version(),
            addr_text(s.src).as_str(),
            addr_text(s.dst).as_str(),
            optional_int(s.src_port),
            optional_int(s.dst_port),
            s.protocol
        )
    }

    fn __richcmp__(&self, other: &Bound<'_, PyAny>, op: CompareOp) -> PyResult<Py<PyAny>> {
        let py = other.py();
        let Ok(other) = other.cast::<PacketInfo>() else {
            return Ok(py.NotImplemented());
        };
        let equal = self.summary == other.get().summary;
        match op {
            CompareOp::Eq => Ok(equal.into_pyobject(py)?.to_owned().into_any().unbind()),
            CompareOp::Ne => Ok((!equal).into_pyobject(py)?.to_owned().into_any().unbind()),
            _ => Ok(py.NotImplemented()),
        }
    }

    fn __hash__(&self) -> u64 {
        // DefaultHasher::new() has fixed keys: equal values hash equally in every process.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.summary.hash(&mut hasher);
        hasher.finish()
    }

    /// Pickles as the constructor call with text addresses.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyType>, Bound<'py, PyTuple>)> {
        let py = slf.py();
        let s = &slf.get().summary;
        let (src, dst) = (addr_text(s.src), addr_text(s.dst));
        let args = (
            s.version(),
            src.as_str(),
            dst.as_str(),
            s.src_port,
            s.dst_port,
            s.protocol,
        );
        Ok((slf.get_type(), args.into_pyobject(py)?))
    }
}
