//! TEMPORARY placeholder, replaced by the gso branch (virtio_net_hdr parsing and software segmentation).

/// Bytes of a virtio_net_hdr.
pub const LEN: usize = 10;

/// Why a header or a super-packet cannot be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoError {
    /// Fewer than 10 bytes.
    ShortHeader,
    /// Segmentation is not available in this build.
    Unsupported,
}

/// A parsed virtio_net_hdr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioNetHdr {
    /// The raw bytes.
    pub raw: [u8; LEN],
}

impl VirtioNetHdr {
    /// Parses the 10 header bytes.
    pub fn parse(bytes: &[u8]) -> Result<VirtioNetHdr, GsoError> {
        let raw: [u8; LEN] = bytes
            .get(..LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(GsoError::ShortHeader)?;
        Ok(VirtioNetHdr { raw })
    }
}

/// Segments a super-packet (placeholder: refuses).
pub fn segment(
    _hdr: &VirtioNetHdr,
    _packet: &[u8],
    _out: &mut Vec<u8>,
    _lengths: &mut Vec<u32>,
) -> Result<usize, GsoError> {
    Err(GsoError::Unsupported)
}
