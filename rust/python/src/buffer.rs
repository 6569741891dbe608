//! Zero-copy access to `bytes`, `bytearray` and `memoryview` (any C-contiguous byte buffer).

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// The bytes of a Python object, borrowed without copying.
///
/// `bytes` is read directly. Anything else goes through the buffer protocol, and the buffer stays exported
/// while this value lives, so a `bytearray` cannot be resized or freed underneath us.
pub enum PacketBytes<'py> {
    Bytes(Bound<'py, PyBytes>),
    Buffer(PyBuffer<u8>),
}

impl<'py> PacketBytes<'py> {
    #[inline]
    pub fn get(obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Ok(bytes) = obj.cast_exact::<PyBytes>() {
            return Ok(PacketBytes::Bytes(bytes.clone()));
        }
        let buffer = PyBuffer::<u8>::get(obj).map_err(|_| {
            let type_name = obj
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "?".into());
            PyTypeError::new_err(format!(
                "expected bytes, bytearray or a memoryview of bytes, got {type_name}"
            ))
        })?;
        if !buffer.is_c_contiguous() {
            return Err(PyTypeError::new_err("a packet buffer must be C-contiguous"));
        }
        Ok(PacketBytes::Buffer(buffer))
    }

    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        match self {
            PacketBytes::Bytes(bytes) => bytes.as_bytes(),
            // SAFETY: PyBuffer::<u8>::get checked the item size is 1 and we checked C-contiguity; the buffer
            // is exported (alive, not resizable) for as long as `self`, and the returned slice borrows `self`.
            PacketBytes::Buffer(buffer) => unsafe {
                std::slice::from_raw_parts(buffer.buf_ptr() as *const u8, buffer.len_bytes())
            },
        }
    }
}

/// Calls `f` with the bytes of `obj`, without copying.
#[inline]
pub fn with_bytes<R>(obj: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> R) -> PyResult<R> {
    if let Ok(bytes) = obj.cast_exact::<PyBytes>() {
        return Ok(f(bytes.as_bytes()));
    }
    let held = PacketBytes::get(obj)?;
    Ok(f(held.as_slice()))
}
