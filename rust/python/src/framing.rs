//! Stream framing for Python: `encode_frames` and `FrameDecoder`.
//!
//! The logic is `vpn_packet_core::framing`; this file converts buffers and errors. Packets come in as any
//! C-contiguous byte buffer (read without copying) and go out as `bytes`.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use vpn_packet_core::framing::{
    FrameDecoder as CoreDecoder, FrameKind, FramingError, DEFAULT_MAX_FRAME_SIZE, KEEPALIVE,
    LENGTH_PREFIX_LEN, MAX_FRAME_SIZE_LIMIT, VNET_HDR_LEN,
};
use vpn_packet_core::gso;

use crate::buffer::{with_bytes, PacketBytes};
use crate::errors::{framing_error, no_panic};
use crate::functions::for_each_item;

// Signature defaults are literals (stubtest reads them); keep them equal to the core default.
const _: () = assert!(DEFAULT_MAX_FRAME_SIZE == 65535);

fn check_max(max_frame_size: usize) -> PyResult<()> {
    if max_frame_size == 0 || max_frame_size > MAX_FRAME_SIZE_LIMIT {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "max_frame_size must be 1..={MAX_FRAME_SIZE_LIMIT}, got {max_frame_size}"
        )));
    }
    Ok(())
}

/// The frames of `packets` (4-byte big-endian length, then the packet) in one `bytes`.
///
/// Raises `FramingError` for an empty packet or one above `max_frame_size` (what a receiver would refuse).
#[pyfunction]
#[pyo3(signature = (packets, max_frame_size = 65535))]
pub fn encode_frames<'py>(
    py: Python<'py>,
    packets: &Bound<'py, PyAny>,
    max_frame_size: usize,
) -> PyResult<Bound<'py, PyBytes>> {
    no_panic(|| {
        check_max(max_frame_size)?;
        // Hold every packet's buffer (a bytearray cannot be resized meanwhile), size the result exactly,
        // then write the frames straight into the new `bytes`: one copy of the payload.
        let mut held: Vec<PacketBytes<'py>> = Vec::new();
        let mut total = 0usize;
        for_each_item(packets, |item| {
            let packet = PacketBytes::get(item)?;
            let len = packet.as_slice().len();
            if len == 0 || len > max_frame_size {
                let err = if len == 0 {
                    FramingError::ZeroLength
                } else {
                    FramingError::TooLarge {
                        len: len as u64,
                        max: max_frame_size,
                    }
                };
                return Err(framing_error(py, &err, None));
            }
            total += LENGTH_PREFIX_LEN + len;
            held.push(packet);
            Ok(())
        })?;
        PyBytes::new_with(py, total, |out| {
            let mut pos = 0;
            for packet in &held {
                let bytes = packet.as_slice();
                out[pos..pos + LENGTH_PREFIX_LEN].copy_from_slice(&(bytes.len() as u32).to_be_bytes());
                pos += LENGTH_PREFIX_LEN;
                out[pos..pos + bytes.len()].copy_from_slice(bytes);
                pos += bytes.len();
            }
            Ok(())
        })
    })
}

/// Splits a byte stream into packets across any read boundaries; holds at most one partial frame.
#[pyclass(module = "vpn_packet._native", name = "FrameDecoder")]
pub struct FrameDecoder {
    inner: CoreDecoder,
    segments: Vec<u8>,
    segment_lengths: Vec<u32>,
    offload_invalid: u64,
}

#[pymethods]
impl FrameDecoder {
    #[new]
    #[pyo3(signature = (max_frame_size = 65535))]
    fn new(max_frame_size: usize) -> PyResult<Self> {
        check_max(max_frame_size)?;
        Ok(FrameDecoder {
            inner: CoreDecoder::new(max_frame_size),
            segments: Vec::new(),
            segment_lengths: Vec::new(),
            offload_invalid: 0,
        })
    }

    /// The complete packets that `data` finishes, in order. Keepalives are skipped; an offload frame (a
    /// super-packet from a peer's TUN) comes out segmented into plain packets (one that cannot be segmented
    /// is dropped and counted in `offload_invalid`).
    ///
    /// A bad length prefix raises `FramingError` (its `frames` holds the packets that came before it in
    /// `data`); the decoder is failed from then on and raises the same error on every call.
    fn feed<'py>(&mut self, py: Python<'py>, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
        no_panic(|| {
            let mut frames: Vec<Bound<'py, PyBytes>> = Vec::new();
            let FrameDecoder {
                inner,
                segments,
                segment_lengths,
                offload_invalid,
            } = self;
            let result = with_bytes(data, |bytes| {
                inner.feed_frames(bytes, |kind, frame| match kind {
                    FrameKind::Packet => frames.push(PyBytes::new(py, frame)),
                    FrameKind::Offload => {
                        let (header, packet) = frame.split_at(VNET_HDR_LEN);
                        segments.clear();
                        segment_lengths.clear();
                        let done = gso::VirtioNetHdr::parse(header)
                            .and_then(|hdr| gso::segment(&hdr, packet, segments, segment_lengths));
                        if done.is_err() {
                            *offload_invalid += 1;
                            return;
                        }
                        let mut start = 0usize;
                        for &len in segment_lengths.iter() {
                            let end = start + len as usize;
                            frames.push(PyBytes::new(py, &segments[start..end]));
                            start = end;
                        }
                    }
                })
            })?;
            let list = PyList::new(py, frames)?;
            match result {
                Ok(()) => Ok(list),
                Err(err) => Err(framing_error(py, &err, Some(list))),
            }
        })
    }

    /// Bytes held of the unfinished frame (length prefix included); at most `max_frame_size + 4`.
    #[getter]
    fn buffered(&self) -> usize {
        self.inner.buffered()
    }

    #[getter]
    fn max_frame_size(&self) -> usize {
        self.inner.max_frame_size()
    }

    /// Complete frames decoded so far.
    #[getter]
    fn frames(&self) -> u64 {
        self.inner.frames()
    }

    /// Payload bytes of the frames decoded so far.
    #[getter]
    fn payload_bytes(&self) -> u64 {
        self.inner.payload_bytes()
    }

    /// Keepalives received so far.
    #[getter]
    fn keepalives(&self) -> u64 {
        self.inner.keepalives()
    }

    /// Offload frames that could not be segmented (dropped).
    #[getter]
    fn offload_invalid(&self) -> u64 {
        self.offload_invalid
    }

    /// True when the stream may end here: no partial frame and no error.
    #[getter]
    fn at_boundary(&self) -> bool {
        self.inner.is_at_boundary()
    }

    /// The reason of the error that failed the decoder (`zero_length`, `too_large`), or `None`.
    #[getter]
    fn error(&self) -> Option<&'static str> {
        self.inner.error().map(|e| e.reason())
    }

    fn __repr__(&self) -> String {
        format!(
            "FrameDecoder(max_frame_size={}, buffered={}, frames={}, error={})",
            self.inner.max_frame_size(),
            self.inner.buffered(),
            self.inner.frames(),
            self.inner
                .error()
                .map_or("None".to_owned(), |e| format!("'{}'", e.reason())),
        )
    }
}

/// Registers the functions, the decoder class and the wire constants. The constants are the core's, so
/// Python never restates the wire format (`vpn_packet.transport.framing` re-exports them).
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("DEFAULT_MAX_FRAME_SIZE", DEFAULT_MAX_FRAME_SIZE)?;
    m.add("MAX_FRAME_SIZE_LIMIT", MAX_FRAME_SIZE_LIMIT)?;
    m.add("LENGTH_PREFIX_LEN", LENGTH_PREFIX_LEN)?;
    m.add("KEEPALIVE_FRAME", PyBytes::new(m.py(), &KEEPALIVE))?;
    m.add_function(wrap_pyfunction!(encode_frames, m)?)?;
    m.add_class::<FrameDecoder>()?;
    Ok(())
}
