//! Streaming pcap/pcapng reading: link-layer frames to raw IP packets, for `vpn-packet inspect`.
//!
//! [`CaptureReader`] wraps any [`Read`] (a file, a pipe, standard input, a byte slice), detects the format
//! from the magic number (legacy pcap in either byte order with micro- or nanosecond timestamps, or pcapng;
//! either one gzip-compressed, decompressed as it streams), and hands out IP packets in [`Batch`]es: one
//! contiguous buffer plus the packet lengths, bounded in packet count and bytes, so memory stays bounded
//! however large the capture. The container format is parsed by the `pcap-parser` crate (the obsolete
//! pcapng Packet Block, which it leaves undecoded, is decoded here); the link layer and the encapsulations
//! inside it (VLAN, MPLS, PPPoE, LLC/SNAP, PBB) are stripped by [`link::strip_link`].
//!
//! Frames that carry no IP packet (ARP, LLDP, ...) and frames of unsupported link types are skipped and
//! counted in [`CaptureStats`], never fatal; so are pcapng blocks this reader does not decode, by type.
//! Errors ([`CaptureError`]) are for the container itself: not a capture, truncated, corrupt (a record
//! longer than any real one, a block that does not fit its length), or I/O; the packets before an error are
//! handed out first. Every function here is total: no input makes it panic or loop forever (the buffer
//! refill loop stops when the input is exhausted or a record exceeds a size limit).

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use flate2::read::MultiGzDecoder;
use pcap_parser::pcapng::Block;
use pcap_parser::traits::{PcapNGPacketBlock, PcapReaderIterator};
use pcap_parser::{LegacyPcapReader, PcapBlockOwned, PcapError, PcapNGReader};

pub mod link;

use link::u32_at;
pub use link::{link_payload, linktype, strip_link, Encapsulation, Encapsulations, LinkPayload};

/// The container format of a capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureFormat {
    /// Legacy libpcap format.
    Pcap { big_endian: bool, nanosecond: bool },
    /// pcapng (sections, interfaces, enhanced and simple packet blocks).
    PcapNg,
}

impl CaptureFormat {
    /// `"pcap"` or `"pcapng"`.
    pub fn name(&self) -> &'static str {
        match self {
            CaptureFormat::Pcap { .. } => "pcap",
            CaptureFormat::PcapNg => "pcapng",
        }
    }
}

impl fmt::Display for CaptureFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaptureFormat::Pcap {
                big_endian,
                nanosecond,
            } => write!(
                f,
                "pcap ({}, {})",
                if *big_endian {
                    "big-endian"
                } else {
                    "little-endian"
                },
                if *nanosecond { "nanosecond" } else { "microsecond" }
            ),
            CaptureFormat::PcapNg => f.write_str("pcapng"),
        }
    }
}

/// Why a capture cannot be read (further). Frame-level problems are never errors: they are counted in
/// [`CaptureStats`].
#[derive(Debug)]
pub enum CaptureError {
    /// The input does not start with a pcap or pcapng magic number; `head` holds its first bytes (empty for
    /// an empty input).
    NotACapture { head: Vec<u8> },
    /// The input ends inside the file header; `len` is its whole length.
    TruncatedHeader { format: &'static str, len: u64 },
    /// The input ends inside the record starting at byte `offset`; `end` is the input's length.
    Truncated { offset: u64, end: u64 },
    /// The record at byte `offset` is not valid (pcapng block structure).
    Corrupt { offset: u64, detail: String },
    /// The record at byte `offset` claims `claimed` bytes (when known), more than `limit`, the largest record
    /// this reader accepts: a corrupt length field, in practice.
    RecordTooLarge {
        offset: u64,
        claimed: Option<u64>,
        limit: usize,
    },
    /// The gzip stream around the capture is corrupt (`truncated`: cut short) after `offset` bytes of
    /// decompressed capture.
    Gzip {
        offset: u64,
        truncated: bool,
        detail: String,
    },
    /// Reading the input failed.
    Io(io::Error),
}

impl CaptureError {
    /// A short stable name for the error, for programs: `not_a_capture`, `truncated_header`, `truncated`,
    /// `corrupt`, `record_too_large` or `io`.
    pub fn kind(&self) -> &'static str {
        match self {
            CaptureError::NotACapture { .. } => "not_a_capture",
            CaptureError::TruncatedHeader { .. } => "truncated_header",
            CaptureError::Truncated { .. } | CaptureError::Gzip { truncated: true, .. } => "truncated",
            CaptureError::Corrupt { .. } | CaptureError::Gzip { .. } => "corrupt",
            CaptureError::RecordTooLarge { .. } => "record_too_large",
            CaptureError::Io(_) => "io",
        }
    }

    /// The byte offset in the (decompressed) input that the error is about, when there is one.
    pub fn offset(&self) -> Option<u64> {
        match self {
            CaptureError::Truncated { offset, .. }
            | CaptureError::Corrupt { offset, .. }
            | CaptureError::RecordTooLarge { offset, .. }
            | CaptureError::Gzip { offset, .. } => Some(*offset),
            CaptureError::TruncatedHeader { .. } => Some(0),
            CaptureError::NotACapture { .. } | CaptureError::Io(_) => None,
        }
    }
}

/// Hex bytes and their printable-ASCII rendering, for "this is not a capture" messages.
fn describe_head(head: &[u8]) -> String {
    let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
    let text: String = head
        .iter()
        .map(|&b| if (0x20..0x7f).contains(&b) { b as char } else { '.' })
        .collect();
    format!("{} ({text:?})", hex.join(" "))
}

/// Compression formats a capture may come in that this reader does not decompress (gzip it does).
const OTHER_COMPRESSIONS: [(&[u8], &str); 4] = [
    (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
    (&[0xfd, b'7', b'z', b'X', b'Z', 0], "xz"),
    (b"BZh", "bzip2"),
    (&[0x04, 0x22, 0x4d, 0x18], "lz4"),
];

impl fmt::Display for CaptureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaptureError::NotACapture { head } if head.is_empty() => {
                f.write_str("not a pcap or pcapng capture: the file is empty")
            }
            CaptureError::NotACapture { head } => {
                write!(
                    f,
                    "not a pcap or pcapng capture: it starts with {}, not a pcap magic (a1b2c3d4, a1b23c4d in \
                     either byte order), the pcapng magic (0a0d0d0a) or gzip's (1f8b)",
                    describe_head(head)
                )?;
                match OTHER_COMPRESSIONS.iter().find(|(magic, _)| head.starts_with(magic)) {
                    Some((_, name)) => write!(f, "; it looks {name}-compressed: decompress it first"),
                    None => Ok(()),
                }
            }
            CaptureError::TruncatedHeader { format, len } => {
                write!(f, "truncated {format} capture: the file ends inside its header, after {len} bytes")
            }
            CaptureError::Truncated { offset, end } => write!(
                f,
                "truncated capture: the record at byte offset {offset} is cut short by the end of the file at \
                 byte {end}"
            ),
            CaptureError::Corrupt { offset, detail } => write!(f, "corrupt capture at byte offset {offset}: {detail}"),
            CaptureError::RecordTooLarge {
                offset,
                claimed: Some(claimed),
                limit,
            } => write!(
                f,
                "corrupt capture at byte offset {offset}: the record claims {claimed} bytes, more than {limit} \
                 (the largest record this reader accepts)"
            ),
            CaptureError::RecordTooLarge {
                offset,
                claimed: None,
                limit,
            } => write!(
                f,
                "corrupt capture at byte offset {offset}: the record claims more than {limit} bytes (the largest \
                 record this reader accepts)"
            ),
            CaptureError::Gzip {
                offset,
                truncated: true,
                ..
            } => write!(
                f,
                "truncated gzip stream: it ends after {offset} bytes of decompressed capture"
            ),
            CaptureError::Gzip { offset, detail, .. } => write!(
                f,
                "corrupt gzip stream after {offset} bytes of decompressed capture: {detail}"
            ),
            CaptureError::Io(err) => write!(f, "I/O error reading the capture: {err}"),
        }
    }
}

impl std::error::Error for CaptureError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CaptureError::Io(err) => Some(err),
            _ => None,
        }
    }
}

/// pcapng block types, for the count of blocks the reader does not decode.
pub mod block_type {
    pub const INTERFACE_DESCRIPTION: u32 = 1;
    /// The obsolete Packet Block, still written by some tools: decoded like an Enhanced Packet Block.
    pub const PACKET: u32 = 2;
    pub const SIMPLE_PACKET: u32 = 3;
    pub const NAME_RESOLUTION: u32 = 4;
    pub const INTERFACE_STATISTICS: u32 = 5;
    pub const ENHANCED_PACKET: u32 = 6;
    pub const SYSTEMD_JOURNAL_EXPORT: u32 = 9;
    pub const DECRYPTION_SECRETS: u32 = 10;
    pub const CUSTOM: u32 = 0x0000_0bad;
    pub const CUSTOM_NO_COPY: u32 = 0x4000_0bad;
    pub const PROCESS_INFORMATION: u32 = 0x8000_0001;
    pub const SECTION_HEADER: u32 = 0x0a0d_0d0a;

    /// The name of a pcapng block type in the pcapng specification, or `None` for one it does not define.
    pub fn name(kind: u32) -> Option<&'static str> {
        Some(match kind {
            INTERFACE_DESCRIPTION => "Interface Description",
            PACKET => "Packet",
            SIMPLE_PACKET => "Simple Packet",
            NAME_RESOLUTION => "Name Resolution",
            INTERFACE_STATISTICS => "Interface Statistics",
            ENHANCED_PACKET => "Enhanced Packet",
            SYSTEMD_JOURNAL_EXPORT => "systemd Journal Export",
            DECRYPTION_SECRETS => "Decryption Secrets",
            CUSTOM | CUSTOM_NO_COPY => "Custom",
            PROCESS_INFORMATION => "Process Information",
            SECTION_HEADER => "Section Header",
            _ => return None,
        })
    }
}

/// What was seen so far. `frames` = `ip_packets` + `non_ip_frames` + `short_frames` +
/// `unsupported_link_frames`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Packet records (pcap records; pcapng enhanced, simple and (obsolete) packet blocks).
    pub frames: u64,
    /// Frames that carry an IP packet (handed out in batches; not yet validated as IP).
    pub ip_packets: u64,
    /// Bytes of those IP packets (as captured: a snap length may have cut them).
    pub ip_bytes: u64,
    /// Frames of a supported link type that carry something else (ARP, LLDP, ...).
    pub non_ip_frames: u64,
    /// Frames too short for their own link-layer header.
    pub short_frames: u64,
    /// Frames of a link type that is not supported, or naming a pcapng interface never described.
    pub unsupported_link_frames: u64,
    /// Frames per link type (`LINKTYPE_*` value).
    pub link_types: BTreeMap<u16, u64>,
    /// Frames per link type and encapsulation crossed (a frame counts once for each encapsulation in it).
    pub encapsulations: BTreeMap<(u16, Encapsulation), u64>,
    /// pcapng blocks this reader does not decode (name resolution, statistics, custom, unknown types...),
    /// by block type as the specification numbers it (whatever the section's byte order).
    pub undecoded_blocks: BTreeMap<u32, u64>,
}

/// IP packets laid end to end in one buffer, with their lengths (the shape `extract_batch_from_buffer`
/// takes). Reused from batch to batch so that reading allocates nothing in the steady state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub data: Vec<u8>,
    pub lengths: Vec<usize>,
}

impl Batch {
    /// Number of packets.
    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    pub fn clear(&mut self) {
        self.data.clear();
        self.lengths.clear();
    }

    fn push(&mut self, packet: &[u8]) {
        self.data.extend_from_slice(packet);
        self.lengths.push(packet.len());
    }

    /// The packets, in order.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let mut start = 0;
        self.lengths.iter().map(move |&len| {
            let packet = &self.data[start..start + len];
            start += len;
            packet
        })
    }
}

/// Sizes that bound a [`CaptureReader`]'s memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReaderOptions {
    /// Most packets in one batch (at least 1).
    pub batch_packets: usize,
    /// Most bytes in one batch; a single larger packet still makes a batch of its own.
    pub batch_bytes: usize,
    /// Initial size of the read buffer (at least 4 KiB; it must hold the file header).
    pub buffer_capacity: usize,
    /// The read buffer grows up to this to hold one record; a record larger than this is an error.
    pub max_record: usize,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions {
            batch_packets: 1024,
            batch_bytes: 4 << 20,
            buffer_capacity: 256 << 10,
            max_record: 16 << 20,
        }
    }
}

impl ReaderOptions {
    const MIN_BUFFER: usize = 4096;

    fn normalized(self) -> Self {
        let buffer_capacity = self.buffer_capacity.max(Self::MIN_BUFFER);
        ReaderOptions {
            batch_packets: self.batch_packets.max(1),
            batch_bytes: self.batch_bytes.max(1),
            buffer_capacity,
            max_record: self.max_record.max(buffer_capacity),
        }
    }
}

/// State shared between the reader and the [`Source`] that `pcap-parser` owns: `pcap-parser` turns read
/// errors into a bare `ReadError`, so the source keeps the real error here.
#[derive(Debug, Default)]
struct Shared {
    error: Option<CaptureError>,
    bytes_read: u64,
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The bytes after the sniffed head: the input itself, or its gzip decompression (all members of a
/// multi-member file, as `gzip -d` does), streamed.
enum Input<R: Read> {
    Plain(R),
    Gzip(Box<MultiGzDecoder<io::Chain<io::Cursor<Vec<u8>>, R>>>),
}

impl<R: Read> Read for Input<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Input::Plain(inner) => inner.read(buf),
            Input::Gzip(inner) => inner.read(buf),
        }
    }
}

/// The error for a failed read `offset` bytes into the capture: a gzip format error (the decoder reports
/// those as `InvalidInput`, `InvalidData` or, cut short, `UnexpectedEof`) or a real I/O error.
fn read_error(err: io::Error, gzip: bool, offset: u64) -> CaptureError {
    match err.kind() {
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof if gzip => {
            CaptureError::Gzip {
                offset,
                truncated: err.kind() == io::ErrorKind::UnexpectedEof,
                detail: err.to_string(),
            }
        }
        _ => CaptureError::Io(err),
    }
}

/// The input as `pcap-parser` sees it: the sniffed first bytes, then the rest of the (decompressed) input.
/// Every `read` fills the buffer unless the input ends (`pcap-parser` parses the file header after a single
/// read, so a short read from a pipe must not look like a truncated file), and `Interrupted` is retried.
struct Source<R: Read> {
    head: Vec<u8>,
    head_pos: usize,
    inner: Input<R>,
    gzip: bool,
    shared: Arc<Mutex<Shared>>,
    /// An error met after some bytes were read: those bytes are returned first, the error next time.
    pending: Option<CaptureError>,
}

impl<R: Read> Source<R> {
    /// Hands `err` to the reader through `shared`; `pcap-parser` sees only that reading failed.
    fn fail(&self, err: CaptureError) -> io::Error {
        lock(&self.shared).error = Some(err);
        io::ErrorKind::Other.into()
    }

    /// The real error behind a `pcap-parser` `ReadError`.
    fn take_error(shared: &Mutex<Shared>) -> CaptureError {
        let err = lock(shared).error.take();
        err.unwrap_or_else(|| CaptureError::Io(io::Error::other("read error")))
    }
}

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(err) = self.pending.take() {
            return Err(self.fail(err));
        }
        let mut filled = 0;
        while filled < buf.len() {
            if self.head_pos < self.head.len() {
                let n = (self.head.len() - self.head_pos).min(buf.len() - filled);
                buf[filled..filled + n].copy_from_slice(&self.head[self.head_pos..self.head_pos + n]);
                self.head_pos += n;
                filled += n;
                continue;
            }
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n.min(buf.len() - filled),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    let offset = lock(&self.shared).bytes_read + filled as u64;
                    let err = read_error(err, self.gzip, offset);
                    if filled == 0 {
                        return Err(self.fail(err));
                    }
                    self.pending = Some(err);
                    break;
                }
            }
        }
        lock(&self.shared).bytes_read += filled as u64;
        Ok(filled)
    }
}

enum Inner<R: Read> {
    Legacy(LegacyPcapReader<Source<R>>),
    Ng(PcapNGReader<Source<R>>),
}

impl<R: Read> Inner<R> {
    fn get(&mut self) -> &mut dyn PcapReaderIterator {
        match self {
            Inner::Legacy(reader) => reader,
            Inner::Ng(reader) => reader,
        }
    }

    fn get_ref(&self) -> &dyn PcapReaderIterator {
        match self {
            Inner::Legacy(reader) => reader,
            Inner::Ng(reader) => reader,
        }
    }
}

/// A pcapng interface description: what its frames' link layer is.
#[derive(Clone, Copy, Debug)]
struct Interface {
    link: u16,
    snaplen: u32,
}

const PCAPNG_MAGIC: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];
/// How far to read before deciding the format (enough to show a useful "not a capture" message).
const SNIFF_LEN: usize = 16;
/// The largest legacy pcap record accepted whatever the file's snap length says (Wireshark's and libpcap's
/// largest snap length for ordinary link types): beyond it and the file's snap length, a record's length
/// field is corrupt.
const LEGACY_MAX_SNAPLEN: usize = 262_144;

/// The legacy pcap magic numbers as they appear in the file: (bytes, big-endian, nanosecond). The
/// "modified" (Kuznetzov) little-endian format is read by `pcap-parser` too.
const PCAP_MAGICS: [([u8; 4], bool, bool); 5] = [
    ([0xd4, 0xc3, 0xb2, 0xa1], false, false),
    ([0xa1, 0xb2, 0xc3, 0xd4], true, false),
    ([0x4d, 0x3c, 0xb2, 0xa1], false, true),
    ([0xa1, 0xb2, 0x3c, 0x4d], true, true),
    ([0x34, 0xcd, 0xb2, 0xa1], false, false),
];

fn sniff_format(head: &[u8]) -> Option<CaptureFormat> {
    let magic: [u8; 4] = head.get(..4)?.try_into().ok()?;
    if magic == PCAPNG_MAGIC {
        return Some(CaptureFormat::PcapNg);
    }
    PCAP_MAGICS
        .iter()
        .find(|(bytes, _, _)| *bytes == magic)
        .map(|&(_, big_endian, nanosecond)| CaptureFormat::Pcap {
            big_endian,
            nanosecond,
        })
}

/// Reads up to `SNIFF_LEN` bytes, retrying short reads and `Interrupted`.
fn read_head(reader: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut head = vec![0; SNIFF_LEN];
    let mut filled = 0;
    while filled < head.len() {
        match reader.read(&mut head[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n.min(SNIFF_LEN - filled),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    head.truncate(filled);
    Ok(head)
}

/// The total length a pcapng block announces (a section header's byte order is read from its own
/// byte-order magic; other blocks use the current section's).
fn pcapng_block_len(data: &[u8], big_endian: bool) -> Option<u32> {
    if data.get(..4)? == PCAPNG_MAGIC {
        let big_endian = data.get(8..12)? == [0x1a, 0x2b, 0x3c, 0x4d];
        return u32_at(data, 4, big_endian);
    }
    u32_at(data, 4, big_endian)
}

/// Why `pcap-parser`'s `next` did not return a block, without borrowing the reader.
enum Stall {
    Eof,
    NeedMore,
    Truncated,
    ReadError,
    Corrupt(String),
}

/// What one step of the reader did.
enum Step {
    Continue,
    Full,
    End,
}

/// What a block is to the reader.
enum Record<'a> {
    /// A packet record: its link type (`None`: an interface never described) and its captured bytes.
    Frame(Option<u16>, &'a [u8]),
    /// A header or interface description (the reader's state was updated).
    Structure,
    /// A pcapng block of a type this reader does not decode (normalized type number).
    Undecoded(u32),
}

/// The link-layer context packet records are read in: the legacy file's link type, or the current pcapng
/// section's interfaces and byte order.
#[derive(Debug, Default)]
struct Context {
    legacy_link: u16,
    interfaces: Vec<Interface>,
    big_endian: bool,
}

impl Context {
    /// A block type as the specification numbers it: `pcap-parser` reads the type field of undecoded blocks
    /// as little-endian whatever the section's byte order.
    fn normalized(&self, raw: u32) -> u32 {
        if self.big_endian {
            raw.swap_bytes()
        } else {
            raw
        }
    }

    /// Classifies a block, updating the interface table from section headers and interface descriptions.
    /// An error is a corrupt block, described.
    fn record<'b>(&mut self, block: &'b PcapBlockOwned<'_>) -> Result<Record<'b>, String> {
        Ok(match block {
            PcapBlockOwned::Legacy(record) => Record::Frame(Some(self.legacy_link), record.data),
            PcapBlockOwned::LegacyHeader(_) => Record::Structure,
            PcapBlockOwned::NG(Block::SectionHeader(shb)) => {
                self.big_endian = shb.big_endian();
                self.interfaces.clear();
                Record::Structure
            }
            PcapBlockOwned::NG(Block::InterfaceDescription(idb)) => {
                let link = (idb.linktype.0 as u32 & 0xffff) as u16;
                self.interfaces.push(Interface {
                    link,
                    snaplen: idb.snaplen,
                });
                Record::Structure
            }
            PcapBlockOwned::NG(Block::EnhancedPacket(epb)) => {
                let link = self.interfaces.get(epb.if_id as usize).map(|i| i.link);
                Record::Frame(link, epb.packet_data())
            }
            PcapBlockOwned::NG(Block::SimplePacket(spb)) => {
                // A simple packet belongs to interface 0; its data is the original length cut to that
                // interface's snap length (padding excluded).
                let first = self.interfaces.first().copied();
                let mut data = spb.packet_data();
                if let Some(Interface { snaplen, .. }) = first {
                    if snaplen != 0 && data.len() > snaplen as usize {
                        data = &data[..snaplen as usize];
                    }
                }
                Record::Frame(first.map(|i| i.link), data)
            }
            PcapBlockOwned::NG(Block::Unknown(unknown)) => {
                // `pcap-parser` checks the trailing length of the blocks it decodes, not of these.
                if unknown.block_len1 != unknown.block_len2 {
                    return Err(format!(
                        "the block's trailing length {} disagrees with its length {}",
                        unknown.block_len2, unknown.block_len1
                    ));
                }
                let kind = self.normalized(unknown.block_type);
                if kind != block_type::PACKET {
                    return Ok(Record::Undecoded(kind));
                }
                let (interface, data) = self.packet_block(unknown.data)?;
                Record::Frame(self.interfaces.get(interface).map(|i| i.link), data)
            }
            PcapBlockOwned::NG(Block::Custom(custom)) => {
                Record::Undecoded(self.normalized(custom.block_type))
            }
            PcapBlockOwned::NG(other) => Record::Undecoded(other.magic()),
        })
    }

    /// The interface and packet bytes of an (obsolete) Packet Block's body: interface id (16 bits), drops
    /// count (16 bits), timestamp (64 bits), captured length, original length, the packet, options.
    fn packet_block<'b>(&self, body: &'b [u8]) -> Result<(usize, &'b [u8]), String> {
        let field = |at| u32_at(body, at, self.big_endian);
        let (Some(head), Some(caplen)) = (field(0), field(12)) else {
            return Err(format!(
                "a Packet Block of {} bytes, shorter than its 32-byte header",
                body.len() + 12
            ));
        };
        let interface = if self.big_endian {
            head >> 16
        } else {
            head & 0xffff
        } as usize;
        match body.get(20..).and_then(|rest| rest.get(..caplen as usize)) {
            Some(data) => Ok((interface, data)),
            None => Err(format!(
                "a Packet Block whose captured length {caplen} runs past its block of {} bytes",
                body.len() + 12
            )),
        }
    }
}

/// A streaming capture reader: see the module documentation.
///
/// ```
/// use vpn_packet_core::capture::{Batch, CaptureReader};
/// # fn main() -> Result<(), vpn_packet_core::capture::CaptureError> {
/// # let bytes: &[u8] = &[0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 101, 0, 0, 0];
/// let mut reader = CaptureReader::new(bytes)?;
/// let mut batch = Batch::default();
/// while reader.next_batch(&mut batch)? {
///     for packet in batch.packets() {
///         // parse `packet` (a raw IP packet)
///     }
/// }
/// println!("{} frames, {} IP packets", reader.stats().frames, reader.stats().ip_packets);
/// # Ok(()) }
/// ```
pub struct CaptureReader<R: Read> {
    inner: Inner<R>,
    format: CaptureFormat,
    gzip: bool,
    context: Context,
    /// The longest legacy pcap record accepted (from the file's snap length, within `max_record`).
    legacy_max: usize,
    /// The legacy file header's snap length (0: none).
    legacy_snaplen: u32,
    options: ReaderOptions,
    capacity: usize,
    shared: Arc<Mutex<Shared>>,
    stats: CaptureStats,
    /// An error met after some packets of a batch: reported by the next call, after those packets.
    pending: Option<CaptureError>,
    done: bool,
}

impl<R: Read> fmt::Debug for CaptureReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaptureReader")
            .field("format", &self.format)
            .field("gzip", &self.gzip)
            .field("options", &self.options)
            .field("stats", &self.stats)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<R: Read> CaptureReader<R> {
    /// Detects the format and reads the file header, with the default [`ReaderOptions`].
    pub fn new(reader: R) -> Result<Self, CaptureError> {
        Self::with_options(reader, ReaderOptions::default())
    }

    /// Detects the format (under gzip compression, if any) and reads the file header.
    pub fn with_options(mut reader: R, options: ReaderOptions) -> Result<Self, CaptureError> {
        let options = options.normalized();
        let head = read_head(&mut reader).map_err(CaptureError::Io)?;
        let gzip = head.starts_with(&GZIP_MAGIC);
        let (head, input) = if gzip {
            let mut decoder = Box::new(MultiGzDecoder::new(io::Cursor::new(head).chain(reader)));
            let head = read_head(&mut decoder).map_err(|err| read_error(err, true, 0))?;
            (head, Input::Gzip(decoder))
        } else {
            (head, Input::Plain(reader))
        };
        let Some(format) = sniff_format(&head) else {
            return Err(CaptureError::NotACapture { head });
        };
        let shared = Arc::new(Mutex::new(Shared::default()));
        let claimed = pcapng_block_len(&head, false).map(u64::from);
        let source = Source {
            head,
            head_pos: 0,
            inner: input,
            gzip,
            shared: Arc::clone(&shared),
            pending: None,
        };
        let capacity = options.buffer_capacity;
        let header_error = |err: PcapError<&'static [u8]>| {
            let len = lock(&shared).bytes_read;
            match err {
                PcapError::ReadError => Source::<R>::take_error(&shared),
                PcapError::Incomplete(_) | PcapError::UnexpectedEof if len < capacity as u64 => {
                    CaptureError::TruncatedHeader {
                        format: format.name(),
                        len,
                    }
                }
                PcapError::Incomplete(_) | PcapError::UnexpectedEof | PcapError::BufferTooSmall => {
                    CaptureError::RecordTooLarge {
                        offset: 0,
                        claimed: claimed.filter(|_| format == CaptureFormat::PcapNg),
                        limit: capacity,
                    }
                }
                other => CaptureError::Corrupt {
                    offset: 0,
                    detail: format!("invalid {} file header ({other})", format.name()),
                },
            }
        };
        let mut reader = match format {
            CaptureFormat::PcapNg => PcapNGReader::new(capacity, source).map(Inner::Ng),
            CaptureFormat::Pcap { .. } => LegacyPcapReader::new(capacity, source).map(Inner::Legacy),
        }
        .map_err(header_error)?;
        let mut context = Context::default();
        let mut legacy_max = options.max_record;
        let mut legacy_snaplen = 0;
        if let Inner::Legacy(legacy) = &mut reader {
            // The first block of a legacy reader is the file header it already parsed.
            if let Ok((offset, PcapBlockOwned::LegacyHeader(header))) = legacy.next() {
                // The upper bits of the field carry FCS information, not the link type.
                context.legacy_link = (header.network.0 as u32 & 0xffff) as u16;
                let snaplen = usize::try_from(header.snaplen).unwrap_or(usize::MAX);
                legacy_max = snaplen.max(LEGACY_MAX_SNAPLEN).min(options.max_record);
                legacy_snaplen = header.snaplen;
                legacy.consume(offset);
            }
        }
        Ok(CaptureReader {
            inner: reader,
            format,
            gzip,
            context,
            legacy_max,
            legacy_snaplen,
            options,
            capacity,
            shared,
            stats: CaptureStats::default(),
            pending: None,
            done: false,
        })
    }

    /// The detected format.
    pub fn format(&self) -> CaptureFormat {
        self.format
    }

    /// `Some("gzip")` for a gzip-compressed capture (offsets then count decompressed bytes), else `None`.
    pub fn compression(&self) -> Option<&'static str> {
        self.gzip.then_some("gzip")
    }

    /// Counters so far.
    pub fn stats(&self) -> &CaptureStats {
        &self.stats
    }

    /// Bytes of the (decompressed) input consumed so far (the offset of the next record).
    pub fn position(&self) -> u64 {
        self.inner.get_ref().consumed() as u64
    }

    /// Fills `batch` (cleared first) with the next IP packets. Returns `Ok(true)` with at least one packet,
    /// `Ok(false)` at the end of the capture. An error met after some packets is returned by the next call,
    /// after those packets; after an error or the end, every call returns `Ok(false)`.
    pub fn next_batch(&mut self, batch: &mut Batch) -> Result<bool, CaptureError> {
        batch.clear();
        if let Some(err) = self.pending.take() {
            self.done = true;
            return Err(err);
        }
        if self.done {
            return Ok(false);
        }
        loop {
            match self.step(batch) {
                Ok(Step::Continue) => {}
                Ok(Step::Full) => return Ok(true),
                Ok(Step::End) => {
                    self.done = true;
                    return Ok(!batch.is_empty());
                }
                Err(err) if batch.is_empty() => {
                    self.done = true;
                    return Err(err);
                }
                Err(err) => {
                    self.pending = Some(err);
                    return Ok(true);
                }
            }
        }
    }

    /// The length the record at the start of the buffer claims, when it is more than any record this reader
    /// accepts: a legacy record beyond the file's snap length (and Wireshark's 256 KiB), any record beyond
    /// `max_record`. Checked before parsing, so that a corrupt length is reported as such at once instead
    /// of reading (and buffering) to the end of the input first.
    fn oversized_record(&mut self) -> Option<(u64, usize)> {
        let big_endian = match self.format {
            CaptureFormat::Pcap { big_endian, .. } => big_endian,
            CaptureFormat::PcapNg => self.context.big_endian,
        };
        let legacy = matches!(self.inner, Inner::Legacy(_));
        let data = self.inner.get().data();
        let (claimed, limit) = match legacy {
            true => (u32_at(data, 8, big_endian)?, self.legacy_max),
            false => (pcapng_block_len(data, big_endian)?, self.options.max_record),
        };
        let claimed = usize::try_from(claimed).unwrap_or(usize::MAX);
        (claimed > limit).then_some((claimed as u64, limit))
    }

    /// Why the legacy record at the start of the buffer, which the end of the input cuts short, is corrupt
    /// rather than truncated: a header whose captured length is more than the packet's length on the wire or
    /// than the file's snap length is not one a capture tool wrote and the end of a file then cut, but a
    /// corrupt length field that points past the end. `None` for a plausible header (a plain cut).
    fn implausible_record(&mut self) -> Option<String> {
        let CaptureFormat::Pcap { big_endian, .. } = self.format else {
            return None;
        };
        let snaplen = self.legacy_snaplen;
        let data = self.inner.get().data();
        let (caplen, origlen) = (u32_at(data, 8, big_endian)?, u32_at(data, 12, big_endian)?);
        if caplen > origlen {
            Some(format!(
                "the record claims {caplen} captured bytes of a {origlen}-byte packet"
            ))
        } else if snaplen != 0 && caplen > snaplen {
            Some(format!(
                "the record claims {caplen} captured bytes, more than the file's snap length {snaplen}"
            ))
        } else {
            None
        }
    }

    /// Reads one block: a frame goes into `batch` (unless the batch is full: then it is left for the next
    /// batch), interface and section blocks update the interface table, anything else is counted.
    fn step(&mut self, batch: &mut Batch) -> Result<Step, CaptureError> {
        if batch.len() >= self.options.batch_packets {
            return Ok(Step::Full);
        }
        let position = self.position();
        if let Some((claimed, limit)) = self.oversized_record() {
            return Err(CaptureError::RecordTooLarge {
                offset: position,
                claimed: Some(claimed),
                limit,
            });
        }
        let it = self.inner.get();
        let stall = match it.next() {
            Ok((0, _)) => Stall::Corrupt("a block of length 0".into()),
            Ok((offset, block)) => match self.context.record(&block) {
                Ok(Record::Frame(link, data)) => {
                    let mut layers = Encapsulations::default();
                    let payload = match link {
                        Some(link) => strip_link(link, data, &mut layers),
                        None => LinkPayload::Unsupported,
                    };
                    if let LinkPayload::Ip(packet) = payload {
                        if !batch.is_empty() && batch.data.len() + packet.len() > self.options.batch_bytes {
                            // Leave the record unconsumed: it starts the next batch.
                            return Ok(Step::Full);
                        }
                        batch.push(packet);
                    }
                    count(&mut self.stats, link, payload, layers);
                    it.consume(offset);
                    return Ok(Step::Continue);
                }
                Ok(Record::Structure) => {
                    it.consume(offset);
                    return Ok(Step::Continue);
                }
                Ok(Record::Undecoded(kind)) => {
                    *self.stats.undecoded_blocks.entry(kind).or_default() += 1;
                    it.consume(offset);
                    return Ok(Step::Continue);
                }
                Err(detail) => Stall::Corrupt(detail),
            },
            Err(PcapError::Eof) => Stall::Eof,
            Err(PcapError::Incomplete(_) | PcapError::BufferTooSmall) => Stall::NeedMore,
            Err(PcapError::UnexpectedEof) => Stall::Truncated,
            Err(PcapError::ReadError) => Stall::ReadError,
            Err(PcapError::NomError(_, kind) | PcapError::OwnedNomError(_, kind)) => {
                Stall::Corrupt(format!("invalid block ({kind:?})"))
            }
            Err(other) => Stall::Corrupt(other.to_string()),
        };
        let stall = match stall {
            Stall::NeedMore | Stall::Truncated if self.holds_invalid_block() => {
                Stall::Corrupt("a block whose content does not fit its length".into())
            }
            other => other,
        };
        match stall {
            Stall::Eof => Ok(Step::End),
            Stall::NeedMore => self.refill(position).map(|()| Step::Continue),
            Stall::Truncated if self.inner.get().data().is_empty() => Ok(Step::End),
            Stall::Truncated => {
                let end = position + self.inner.get().data().len() as u64;
                Err(match self.implausible_record() {
                    Some(detail) => CaptureError::Corrupt {
                        offset: position,
                        detail: format!("{detail}, and the file ends at byte {end}"),
                    },
                    None => CaptureError::Truncated {
                        offset: position,
                        end,
                    },
                })
            }
            Stall::ReadError => Err(Source::<R>::take_error(&self.shared)),
            Stall::Corrupt(detail) => {
                if let Some(kind) = self.skip_undecodable_block() {
                    *self.stats.undecoded_blocks.entry(kind).or_default() += 1;
                    return Ok(Step::Continue);
                }
                let data = self.inner.get().data();
                let header = describe_head(&data[..data.len().min(8)]);
                Err(CaptureError::Corrupt {
                    offset: position,
                    detail: format!("{detail}; the block starts {header}"),
                })
            }
        }
    }

    /// The pcapng block at the start of the buffer, when it is whole and well framed (both lengths agree)
    /// and is of a type this reader would not decode anyway, whose content `pcap-parser` rejected (a name
    /// resolution or statistics block with a bad option, say): skipped and its type returned, since it says
    /// nothing about the frames around it. `None` leaves the buffer as it was.
    fn skip_undecodable_block(&mut self) -> Option<u32> {
        if !matches!(self.inner, Inner::Ng(_)) {
            return None;
        }
        let big_endian = self.context.big_endian;
        let it = self.inner.get();
        let data = it.data();
        let kind = u32_at(data, 0, big_endian)?;
        let len = u32_at(data, 4, big_endian)? as usize;
        let decoded = [
            block_type::SECTION_HEADER,
            block_type::INTERFACE_DESCRIPTION,
            block_type::PACKET,
            block_type::SIMPLE_PACKET,
            block_type::ENHANCED_PACKET,
        ];
        if decoded.contains(&kind) || len < 12 || len % 4 != 0 || len > data.len() {
            return None;
        }
        if u32_at(data, len - 4, big_endian)? as usize != len {
            return None;
        }
        it.consume(len);
        Some(kind)
    }

    /// True when `pcap-parser` asks for more input although the buffer already holds the whole pcapng block
    /// its header announces (or the announced length is below the 12-byte minimum): the block's content is
    /// invalid, and reading on would only end in a misleading "truncated".
    fn holds_invalid_block(&mut self) -> bool {
        if !matches!(self.inner, Inner::Ng(_)) {
            return false;
        }
        let big_endian = self.context.big_endian;
        let data = self.inner.get().data();
        match pcapng_block_len(data, big_endian) {
            Some(len) => len < 12 || len as usize <= data.len(),
            None => false,
        }
    }

    /// Reads more input after an incomplete record. When nothing more could be read because the buffer is
    /// full (the record is larger than the buffer), grows the buffer, up to `max_record`. Every call thus
    /// reads, reaches the end of input (the next `next` then reports end or truncation), grows, or fails:
    /// the incomplete/refill loop cannot spin.
    fn refill(&mut self, position: u64) -> Result<(), CaptureError> {
        let it = self.inner.get();
        let before = it.data().len();
        if it.refill().is_err() {
            return Err(Source::<R>::take_error(&self.shared));
        }
        if it.data().len() > before || it.reader_exhausted() {
            return Ok(());
        }
        if self.capacity >= self.options.max_record {
            return Err(CaptureError::RecordTooLarge {
                offset: position,
                claimed: None,
                limit: self.options.max_record,
            });
        }
        self.capacity = self.capacity.saturating_mul(2).min(self.options.max_record);
        it.grow(self.capacity);
        Ok(())
    }
}

/// Counts one frame of link type `link` (`None`: unknown interface) that crossed `layers` in `stats`.
fn count(stats: &mut CaptureStats, link: Option<u16>, payload: LinkPayload<'_>, layers: Encapsulations) {
    stats.frames += 1;
    if let Some(link) = link {
        *stats.link_types.entry(link).or_default() += 1;
        for encapsulation in layers.iter() {
            *stats.encapsulations.entry((link, encapsulation)).or_default() += 1;
        }
    }
    match payload {
        LinkPayload::Ip(packet) => {
            stats.ip_packets += 1;
            stats.ip_bytes += packet.len() as u64;
        }
        LinkPayload::NotIp => stats.non_ip_frames += 1,
        LinkPayload::Short => stats.short_frames += 1,
        LinkPayload::Unsupported => stats.unsupported_link_frames += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // ---- captures written by hand ----

    /// A 28-byte IPv4/UDP packet to 10.0.0.`dst`, port 53.
    fn ipv4(dst: u8) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 9, 9, 9, 10, 0, 0, dst,
        ];
        p.extend_from_slice(&[0x30, 0x39, 0, 53, 0, 8, 0, 0]);
        p
    }

    /// A 48-byte IPv6/UDP packet to 2001:db8::`dst`.
    fn ipv6(dst: u8) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
        p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, dst]);
        p.extend_from_slice(&[0x30, 0x39, 0x01, 0xbb, 0, 8, 0, 0]);
        p
    }

    fn ethernet(ethertype: u16, vlans: &[u16], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        for (i, &tpid) in vlans.iter().enumerate() {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&(100 + i as u16).to_be_bytes()); // TCI: VLAN id
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn arp() -> Vec<u8> {
        ethernet(
            0x0806,
            &[],
            &[
                0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 2, 10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 10, 0, 0, 1,
            ],
        )
    }

    fn w32(out: &mut Vec<u8>, v: u32, be: bool) {
        out.extend_from_slice(&if be { v.to_be_bytes() } else { v.to_le_bytes() });
    }

    fn w16(out: &mut Vec<u8>, v: u16, be: bool) {
        out.extend_from_slice(&if be { v.to_be_bytes() } else { v.to_le_bytes() });
    }

    /// A legacy pcap file: `magic` is the native value (0xa1b2c3d4 or 0xa1b23c4d), written in `be` order.
    fn pcap_with(magic: u32, be: bool, link: u32, frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        w32(&mut out, magic, be);
        w16(&mut out, 2, be);
        w16(&mut out, 4, be);
        w32(&mut out, 0, be);
        w32(&mut out, 0, be);
        w32(&mut out, 65535, be);
        w32(&mut out, link, be);
        for (i, frame) in frames.iter().enumerate() {
            w32(&mut out, 1_700_000_000 + i as u32, be);
            w32(&mut out, 0, be);
            w32(&mut out, frame.len() as u32, be);
            w32(&mut out, frame.len() as u32, be);
            out.extend_from_slice(frame);
        }
        out
    }

    fn pcap(link: u32, frames: &[Vec<u8>]) -> Vec<u8> {
        pcap_with(0xa1b2_c3d4, false, link, frames)
    }

    /// A pcapng block: type, total length, body padded to 4 bytes, total length.
    fn block(kind: u32, body: &[u8], be: bool) -> Vec<u8> {
        let padded = body.len().div_ceil(4) * 4;
        let total = (12 + padded) as u32;
        let mut out = Vec::new();
        w32(&mut out, kind, be);
        w32(&mut out, total, be);
        out.extend_from_slice(body);
        out.resize(8 + padded, 0);
        w32(&mut out, total, be);
        out
    }

    fn shb(be: bool) -> Vec<u8> {
        let mut body = Vec::new();
        w32(&mut body, 0x1a2b_3c4d, be);
        w16(&mut body, 1, be);
        w16(&mut body, 0, be);
        body.extend_from_slice(&[0xff; 8]); // section length: unknown
        block(0x0a0d_0d0a, &body, be)
    }

    fn idb(link: u16, snaplen: u32, be: bool) -> Vec<u8> {
        let mut body = Vec::new();
        w16(&mut body, link, be);
        w16(&mut body, 0, be);
        w32(&mut body, snaplen, be);
        block(1, &body, be)
    }

    fn epb(interface: u32, frame: &[u8], be: bool) -> Vec<u8> {
        let mut body = Vec::new();
        w32(&mut body, interface, be);
        w32(&mut body, 0, be);
        w32(&mut body, 0, be);
        w32(&mut body, frame.len() as u32, be);
        w32(&mut body, frame.len() as u32, be);
        body.extend_from_slice(frame);
        body.resize(20 + frame.len().div_ceil(4) * 4, 0);
        block(6, &body, be)
    }

    fn spb(frame: &[u8], original_len: u32, be: bool) -> Vec<u8> {
        let mut body = Vec::new();
        w32(&mut body, original_len, be);
        body.extend_from_slice(frame);
        block(3, &body, be)
    }

    /// Everything a reader yields: packets, stats, and the error that ended it (if any).
    struct Outcome {
        packets: Vec<Vec<u8>>,
        batches: Vec<usize>,
        stats: CaptureStats,
        error: Option<CaptureError>,
    }

    fn read_with(input: &[u8], options: ReaderOptions) -> Result<Outcome, CaptureError> {
        let mut reader = CaptureReader::with_options(input, options)?;
        let mut batch = Batch::default();
        let mut outcome = Outcome {
            packets: vec![],
            batches: vec![],
            stats: CaptureStats::default(),
            error: None,
        };
        loop {
            match reader.next_batch(&mut batch) {
                Ok(true) => {
                    assert!(!batch.is_empty());
                    outcome.batches.push(batch.len());
                    outcome.packets.extend(batch.packets().map(<[u8]>::to_vec));
                }
                Ok(false) => break,
                Err(err) => {
                    outcome.error = Some(err);
                    assert!(
                        !reader.next_batch(&mut batch).unwrap(),
                        "a reader stays done after an error"
                    );
                    break;
                }
            }
        }
        outcome.stats = reader.stats().clone();
        Ok(outcome)
    }

    fn read(input: &[u8]) -> Outcome {
        read_with(input, ReaderOptions::default()).expect("a valid capture header")
    }

    fn ip_only(link: u32, packets: &[Vec<u8>], frames: &[Vec<u8>]) {
        let outcome = read(&pcap(link, frames));
        assert!(outcome.error.is_none(), "link {link}: {:?}", outcome.error);
        assert_eq!(outcome.packets, packets, "link {link}");
        assert_eq!(outcome.stats.frames, frames.len() as u64);
        assert_eq!(outcome.stats.ip_packets, packets.len() as u64);
    }

    // ---- formats ----

    #[test]
    fn legacy_pcap_in_both_byte_orders_and_resolutions() {
        let packets = vec![ipv4(1), ipv6(2), ipv4(3)];
        for (magic, be, nanosecond) in [
            (0xa1b2_c3d4, false, false),
            (0xa1b2_c3d4, true, false),
            (0xa1b2_3c4d, false, true),
            (0xa1b2_3c4d, true, true),
        ] {
            let input = pcap_with(magic, be, 101, &packets);
            let reader = CaptureReader::new(input.as_slice()).unwrap();
            assert_eq!(
                reader.format(),
                CaptureFormat::Pcap {
                    big_endian: be,
                    nanosecond
                }
            );
            let outcome = read(&input);
            assert!(outcome.error.is_none());
            assert_eq!(outcome.packets, packets, "magic {magic:x} be {be}");
            assert_eq!(outcome.stats.link_types, BTreeMap::from([(101, 3)]));
            assert_eq!(outcome.stats.ip_bytes, 28 + 48 + 28);
        }
    }

    #[test]
    fn legacy_link_type_fcs_bits_are_ignored() {
        // Bit 28 and the FCS length live in the upper bits of the link-type field.
        let outcome = read(&pcap(0x1400_0001, &[ethernet(0x0800, &[], &ipv4(1))]));
        assert_eq!(outcome.packets, vec![ipv4(1)]);
        assert_eq!(outcome.stats.link_types, BTreeMap::from([(1, 1)]));
    }

    #[test]
    fn pcapng_interfaces_epb_spb_and_sections_in_both_byte_orders() {
        for be in [false, true] {
            let mut input = shb(be);
            input.extend(idb(linktype::ETHERNET, 0, be));
            input.extend(idb(linktype::RAW, 0, be));
            input.extend(epb(0, &ethernet(0x0800, &[], &ipv4(1)), be));
            input.extend(epb(1, &ipv6(2), be));
            input.extend(block(0x0000_0004, &[0, 0, 0, 0], be)); // name resolution, end of records: skipped
            input.extend(block(0x4242_4242, &[0; 8], be)); // unknown block type: skipped
            input.extend(spb(&ethernet(0x0800, &[], &ipv4(3)), 42, be));
            input.extend(epb(7, &ipv4(4), be)); // interface never described
                                                // A new section forgets the interfaces of the previous one.
            input.extend(shb(be));
            input.extend(epb(1, &ipv4(5), be));
            input.extend(idb(linktype::IPV4, 0, be));
            input.extend(epb(0, &ipv4(6), be));
            let outcome = read(&input);
            assert!(outcome.error.is_none(), "{:?}", outcome.error);
            assert_eq!(
                outcome.packets,
                vec![ipv4(1), ipv6(2), ipv4(3), ipv4(6)],
                "be {be}"
            );
            assert_eq!(outcome.stats.frames, 6);
            assert_eq!(outcome.stats.unsupported_link_frames, 2);
            assert_eq!(
                outcome.stats.link_types,
                BTreeMap::from([(1, 2), (101, 1), (228, 1)])
            );
        }
    }

    #[test]
    fn pcapng_simple_packet_is_cut_to_snaplen_and_original_length() {
        let frame = ethernet(0x0800, &[], &ipv4(1)); // 42 bytes, padded to 44 in the block
        let mut input = shb(false);
        input.extend(idb(linktype::ETHERNET, 30, false));
        input.extend(spb(&frame, frame.len() as u32, false));
        let outcome = read(&input);
        assert_eq!(outcome.packets, vec![ipv4(1)[..16].to_vec()]);
        let mut input = shb(false);
        input.extend(idb(linktype::ETHERNET, 0, false));
        input.extend(spb(&frame, frame.len() as u32, false));
        assert_eq!(read(&input).packets, vec![ipv4(1)]);
    }

    // ---- link types ----

    #[test]
    fn ethernet_with_and_without_vlan_tags() {
        let frames = vec![
            ethernet(0x0800, &[], &ipv4(1)),
            ethernet(0x86dd, &[], &ipv6(2)),
            ethernet(0x0800, &[0x8100], &ipv4(3)),
            ethernet(0x86dd, &[0x88a8, 0x8100], &ipv6(4)),
            ethernet(0x0800, &[0x9100, 0x8100, 0x8100], &ipv4(5)),
            arp(),
            ethernet(0x88cc, &[], &[0; 30]),                 // LLDP
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], // shorter than an Ethernet header
            ethernet(0x8100, &[], &[0, 1]),                  // a VLAN tag cut short
        ];
        let outcome = read(&pcap(1, &frames));
        assert_eq!(outcome.packets, vec![ipv4(1), ipv6(2), ipv4(3), ipv6(4), ipv4(5)]);
        let s = &outcome.stats;
        assert_eq!(
            (s.frames, s.ip_packets, s.non_ip_frames, s.short_frames),
            (9, 5, 2, 2)
        );
    }

    #[test]
    fn raw_ip_link_types() {
        for link in [101, 12, 14, 228, 229] {
            ip_only(link, &[ipv4(1), ipv6(2)], &[ipv4(1), ipv6(2)]);
        }
        // Raw IP hands every frame to the IP parser, even an empty or non-IP one: it is the judge.
        let outcome = read(&pcap(101, &[vec![], vec![0x99; 5]]));
        assert_eq!(outcome.packets, vec![vec![], vec![0x99; 5]]);
    }

    #[test]
    fn null_loopback_family_in_either_byte_order() {
        let frame = |family: [u8; 4], packet: &[u8]| [family.as_slice(), packet].concat();
        let frames = vec![
            frame(2u32.to_le_bytes(), &ipv4(1)),
            frame(2u32.to_be_bytes(), &ipv4(2)),
            frame(10u32.to_le_bytes(), &ipv6(3)),
            frame(24u32.to_le_bytes(), &ipv6(4)),
            frame(28u32.to_be_bytes(), &ipv6(5)),
            frame(30u32.to_le_bytes(), &ipv6(6)),
            frame(7u32.to_le_bytes(), &[0; 20]), // another family
            vec![2, 0],                          // too short for the family
        ];
        let outcome = read(&pcap(0, &frames));
        assert_eq!(
            outcome.packets,
            vec![ipv4(1), ipv4(2), ipv6(3), ipv6(4), ipv6(5), ipv6(6)]
        );
        assert_eq!((outcome.stats.non_ip_frames, outcome.stats.short_frames), (1, 1));
    }

    #[test]
    fn loop_family_in_network_order() {
        let frames = vec![
            [2u32.to_be_bytes().as_slice(), &ipv4(1)].concat(),
            [30u32.to_be_bytes().as_slice(), &ipv6(2)].concat(),
            [2u32.to_le_bytes().as_slice(), &ipv4(3)].concat(), // little-endian: an unknown family here
        ];
        let outcome = read(&pcap(108, &frames));
        assert_eq!(outcome.packets, vec![ipv4(1), ipv6(2)]);
        assert_eq!(outcome.stats.non_ip_frames, 1);
    }

    fn sll(protocol: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0, 0, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0];
        f.extend_from_slice(&protocol.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn sll2(protocol: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = protocol.to_be_bytes().to_vec();
        f.extend_from_slice(&[0, 0, 0, 0, 0, 3, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn linux_cooked_captures() {
        let vlan = |inner: u16, packet: &[u8]| [&[0, 100][..], &inner.to_be_bytes(), packet].concat();
        let frames = vec![
            sll(0x0800, &ipv4(1)),
            sll(0x86dd, &ipv6(2)),
            sll(0x8100, &vlan(0x0800, &ipv4(3))),
            sll(0x0806, &[0; 28]),
            sll(0x0800, &[])[..15].to_vec(),
        ];
        let outcome = read(&pcap(113, &frames));
        assert_eq!(outcome.packets, vec![ipv4(1), ipv6(2), ipv4(3)]);
        assert_eq!((outcome.stats.non_ip_frames, outcome.stats.short_frames), (1, 1));

        let frames = vec![
            sll2(0x0800, &ipv4(1)),
            sll2(0x86dd, &ipv6(2)),
            sll2(0x8100, &vlan(0x86dd, &ipv6(3))),
            sll2(0x0806, &[0; 28]),
            sll2(0x0800, &[])[..19].to_vec(),
        ];
        let outcome = read(&pcap(276, &frames));
        assert_eq!(outcome.packets, vec![ipv4(1), ipv6(2), ipv6(3)]);
        assert_eq!((outcome.stats.non_ip_frames, outcome.stats.short_frames), (1, 1));
    }

    #[test]
    fn unsupported_link_type_is_counted_not_fatal() {
        let outcome = read(&pcap(105, &[vec![0; 40], vec![0; 50]])); // IEEE 802.11
        assert!(outcome.error.is_none());
        assert!(outcome.packets.is_empty());
        assert_eq!(outcome.stats.unsupported_link_frames, 2);
        assert_eq!(outcome.stats.link_types, BTreeMap::from([(105, 2)]));
    }

    // ---- batches ----

    #[test]
    fn batches_are_bounded_by_count_and_bytes() {
        let packets: Vec<Vec<u8>> = (0..100).map(|i| ipv4(i as u8)).collect();
        let input = pcap(101, &packets);
        let options = ReaderOptions {
            batch_packets: 7,
            ..ReaderOptions::default()
        };
        let outcome = read_with(&input, options).unwrap();
        assert_eq!(outcome.packets, packets);
        assert_eq!(outcome.batches, [vec![7; 14], vec![2]].concat());

        let options = ReaderOptions {
            batch_bytes: 100,
            ..ReaderOptions::default()
        }; // 3 packets of 28
        let outcome = read_with(&input, options).unwrap();
        assert_eq!(outcome.packets, packets);
        assert_eq!(outcome.batches, [vec![3; 33], vec![1]].concat());

        // A packet larger than the byte bound makes a batch of its own.
        let big = [vec![0x45], vec![0; 499]].concat();
        let input = pcap(101, &[ipv4(1), big.clone(), ipv4(2)]);
        let outcome = read_with(
            &input,
            ReaderOptions {
                batch_bytes: 100,
                ..ReaderOptions::default()
            },
        )
        .unwrap();
        assert_eq!(outcome.batches, vec![1, 1, 1]);
        assert_eq!(outcome.packets[1], big);
    }

    #[test]
    fn non_ip_frames_do_not_make_empty_batches() {
        let frames: Vec<Vec<u8>> = (0..50)
            .map(|_| arp())
            .chain([ethernet(0x0800, &[], &ipv4(9))])
            .collect();
        let outcome = read_with(
            &pcap(1, &frames),
            ReaderOptions {
                batch_packets: 1,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(outcome.batches, vec![1]);
        assert_eq!(outcome.stats.non_ip_frames, 50);
    }

    #[test]
    fn records_larger_than_the_buffer_grow_it() {
        let big = [ipv4(1), vec![0xab; 20_000]].concat();
        let options = ReaderOptions {
            buffer_capacity: 4096,
            ..ReaderOptions::default()
        };
        let input = pcap(101, &[ipv4(1), big.clone(), ipv4(2)]);
        let outcome = read_with(&input, options).unwrap();
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(outcome.packets, vec![ipv4(1), big.clone(), ipv4(2)]);

        let mut ng = shb(true);
        ng.extend(idb(linktype::RAW, 0, true));
        ng.extend(epb(0, &big, true));
        let outcome = read_with(&ng, options).unwrap();
        assert_eq!(outcome.packets, vec![big]);
    }

    #[test]
    fn a_record_beyond_max_record_is_an_error_not_a_hang() {
        // The record claims 1 GB and the file has more than `max_record` bytes after it.
        let mut input = pcap(101, &[ipv4(1)]);
        input.extend_from_slice(&[0; 8]);
        input.extend_from_slice(&1_000_000_000u32.to_le_bytes());
        input.extend_from_slice(&1_000_000_000u32.to_le_bytes());
        input.extend(vec![0x45; 100_000]);
        let options = ReaderOptions {
            buffer_capacity: 4096,
            max_record: 16_384,
            ..ReaderOptions::default()
        };
        let outcome = read_with(&input, options).unwrap();
        assert_eq!(outcome.packets, vec![ipv4(1)]);
        let err = outcome.error.expect("an error");
        assert!(
            matches!(
                err,
                CaptureError::RecordTooLarge {
                    offset: 68,
                    claimed: Some(1_000_000_000),
                    limit: 16_384
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("byte offset 68"), "{err}");
    }

    // ---- errors ----

    #[test]
    fn truncated_capture_gives_the_packets_before_the_cut_then_an_error() {
        let packets: Vec<Vec<u8>> = (0..10).map(|i| ipv4(i as u8)).collect();
        let input = pcap(101, &packets);
        // Each record is 16 + 28 = 44 bytes after the 24-byte header; cut inside record 6's data, then inside
        // its record header.
        for cut in [24 + 6 * 44 + 20, 24 + 6 * 44 + 5] {
            let outcome = read(&input[..cut]);
            assert_eq!(outcome.packets, packets[..6]);
            match outcome.error {
                Some(CaptureError::Truncated { offset, end }) => {
                    assert_eq!((offset, end), (24 + 6 * 44, cut as u64));
                }
                other => panic!("expected Truncated, got {other:?}"),
            }
        }
        let err = read(&input[..24 + 6 * 44 + 20]).error.unwrap();
        assert_eq!(err.kind(), "truncated");
        assert_eq!(err.offset(), Some(288));
        assert_eq!(
            err.to_string(),
            "truncated capture: the record at byte offset 288 is cut short by the end of the file at byte 308"
        );

        let mut ng = shb(false);
        ng.extend(idb(linktype::RAW, 0, false));
        let start = ng.len();
        ng.extend(epb(0, &ipv4(1), false));
        ng.extend(epb(0, &ipv4(2), false));
        let outcome = read(&ng[..ng.len() - 3]);
        assert_eq!(outcome.packets, vec![ipv4(1)]);
        assert!(
            matches!(outcome.error, Some(CaptureError::Truncated { offset, .. }) if offset == start as u64 + 60)
        );
    }

    #[test]
    fn a_capture_cut_on_a_record_boundary_is_complete() {
        let input = pcap(101, &[ipv4(1), ipv4(2)]);
        let outcome = read(&input[..24 + 44]);
        assert!(outcome.error.is_none());
        assert_eq!(outcome.packets, vec![ipv4(1)]);
        assert!(read(&input[..24]).packets.is_empty());
    }

    #[test]
    fn not_a_capture() {
        let err = CaptureReader::new(&b"GET / HTTP/1.1\r\nHost: example\r\n"[..]).unwrap_err();
        assert_eq!(err.kind(), "not_a_capture");
        let text = err.to_string();
        assert!(
            text.starts_with("not a pcap or pcapng capture: it starts with 47 45 54 20"),
            "{text}"
        );
        assert!(text.contains("\"GET / HTTP/1.1..\""), "{text}");

        let err = CaptureReader::new(&b""[..]).unwrap_err();
        assert_eq!(err.to_string(), "not a pcap or pcapng capture: the file is empty");
        assert!(matches!(
            CaptureReader::new(&[0xd4, 0xc3][..]),
            Err(CaptureError::NotACapture { .. })
        ));
    }

    #[test]
    fn truncated_or_corrupt_file_header() {
        let input = pcap(101, &[]);
        let err = CaptureReader::new(&input[..10]).unwrap_err();
        assert!(
            matches!(
                err,
                CaptureError::TruncatedHeader {
                    format: "pcap",
                    len: 10
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "truncated pcap capture: the file ends inside its header, after 10 bytes"
        );

        let err = CaptureReader::new(&shb(false)[..20]).unwrap_err();
        assert!(
            matches!(
                err,
                CaptureError::TruncatedHeader {
                    format: "pcapng",
                    len: 20
                }
            ),
            "{err:?}"
        );

        let mut bad = shb(false);
        bad[8..12].copy_from_slice(&[1, 2, 3, 4]); // byte-order magic
        let err = CaptureReader::new(bad.as_slice()).unwrap_err();
        assert_eq!(err.kind(), "corrupt", "{err:?}");
    }

    #[test]
    fn corrupt_pcapng_block() {
        let mut input = shb(false);
        input.extend(idb(linktype::RAW, 0, false));
        let at = input.len() as u64;
        input.extend(epb(0, &ipv4(1), false));
        let mut bad = epb(0, &ipv4(2), false);
        let n = bad.len();
        bad[n - 4..].copy_from_slice(&[0xee; 4]); // trailing length disagrees
        input.extend(bad);
        input.extend(epb(0, &ipv4(3), false));
        let outcome = read(&input);
        assert_eq!(outcome.packets, vec![ipv4(1)]);
        let err = outcome.error.unwrap();
        assert!(
            matches!(err, CaptureError::Corrupt { offset, .. } if offset == at + 60),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("the block starts 06 00 00 00 3c 00 00 00"),
            "{err}"
        );

        let mut input = shb(false);
        input.extend([6, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0]); // block length below the minimum
        assert_eq!(read(&input).error.unwrap().kind(), "corrupt");
    }

    /// A reader that serves `data` a few bytes at a time, then fails.
    struct Flaky<'a> {
        data: &'a [u8],
        chunk: usize,
        fail: Option<io::ErrorKind>,
    }

    impl Read for Flaky<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.data.is_empty() {
                return match self.fail {
                    Some(kind) => Err(io::Error::new(kind, "disk on fire")),
                    None => Ok(0),
                };
            }
            let n = self.chunk.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn short_reads_are_fine_and_io_errors_are_kept() {
        let packets: Vec<Vec<u8>> = (0..20).map(|i| ipv4(i as u8)).collect();
        let input = pcap(101, &packets);
        let mut reader = CaptureReader::new(Flaky {
            data: &input,
            chunk: 3,
            fail: None,
        })
        .unwrap();
        let mut batch = Batch::default();
        assert!(reader.next_batch(&mut batch).unwrap());
        assert_eq!(batch.len(), 20);
        assert!(!reader.next_batch(&mut batch).unwrap());

        let mut reader = CaptureReader::new(Flaky {
            data: &input,
            chunk: 7,
            fail: Some(io::ErrorKind::PermissionDenied),
        })
        .unwrap();
        // The packets read before the failure come first, then the error.
        assert!(reader.next_batch(&mut batch).unwrap());
        assert_eq!(batch.len(), 20);
        let err = reader.next_batch(&mut batch).unwrap_err();
        match &err {
            CaptureError::Io(inner) => assert_eq!(inner.kind(), io::ErrorKind::PermissionDenied),
            other => panic!("expected Io, got {other:?}"),
        }
        assert_eq!(err.to_string(), "I/O error reading the capture: disk on fire");
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn link_type_names() {
        assert_eq!(linktype::name(276), Some("LINUX_SLL2"));
        assert_eq!(linktype::name(14), Some("RAW"));
        assert_eq!(linktype::name(105), None);
        assert!(!linktype::is_supported(105));
        assert_eq!(
            CaptureFormat::Pcap {
                big_endian: true,
                nanosecond: true
            }
            .to_string(),
            "pcap (big-endian, nanosecond)"
        );
    }

    // ---- pcapng blocks the reader does not decode, and the obsolete Packet Block ----

    /// An obsolete Packet Block (type 2): interface (16 bits), drops (16 bits), timestamp, lengths, data.
    fn packet_block(interface: u16, frame: &[u8], be: bool) -> Vec<u8> {
        let mut body = Vec::new();
        w16(&mut body, interface, be);
        w16(&mut body, 0, be);
        w32(&mut body, 0, be);
        w32(&mut body, 0, be);
        w32(&mut body, frame.len() as u32, be);
        w32(&mut body, frame.len() as u32, be);
        body.extend_from_slice(frame);
        block(2, &body, be)
    }

    #[test]
    fn packet_blocks_are_decoded_and_other_blocks_counted_by_type() {
        for be in [false, true] {
            let mut input = shb(be);
            input.extend(idb(linktype::RAW, 0, be));
            input.extend(idb(linktype::ETHERNET, 0, be));
            for i in 0..200u16 {
                input.extend(packet_block(
                    i % 2,
                    &if i % 2 == 0 {
                        ipv4(i as u8)
                    } else {
                        ethernet(0x86dd, &[], &ipv6(i as u8))
                    },
                    be,
                ));
            }
            input.extend(packet_block(5, &ipv4(1), be)); // an interface never described
            input.extend(block(4, &[0, 0, 0, 0], be)); // name resolution
            input.extend(block(5, &[0; 12], be)); // interface statistics
            input.extend(block(5, &[0; 12], be));
            input.extend(block(0x0bad, &[0; 8], be)); // custom
            input.extend(block(0x4242_4242, &[0; 8], be)); // unknown
            let outcome = read(&input);
            assert!(outcome.error.is_none(), "{:?}", outcome.error);
            assert_eq!(outcome.packets.len(), 200);
            assert_eq!(outcome.packets[0], ipv4(0));
            assert_eq!(outcome.packets[199], ipv6(199));
            assert_eq!(
                (outcome.stats.frames, outcome.stats.unsupported_link_frames),
                (201, 1)
            );
            assert_eq!(
                outcome.stats.undecoded_blocks,
                BTreeMap::from([(4, 1), (5, 2), (0x0bad, 1), (0x4242_4242, 1)]),
                "be {be}"
            );
        }
        assert_eq!(block_type::name(2), Some("Packet"));
        assert_eq!(block_type::name(0x4242_4242), None);
    }

    #[test]
    fn a_packet_block_whose_length_runs_past_its_block_is_corrupt() {
        let mut input = shb(false);
        input.extend(idb(linktype::RAW, 0, false));
        input.extend(packet_block(0, &ipv4(1), false));
        let at = input.len() as u64;
        let mut bad = packet_block(0, &ipv4(2), false);
        bad[20..24].copy_from_slice(&500u32.to_le_bytes());
        input.extend(bad);
        let outcome = read(&input);
        assert_eq!(outcome.packets, vec![ipv4(1)]);
        let err = outcome.error.unwrap();
        assert_eq!((err.kind(), err.offset()), ("corrupt", Some(at)));
        assert!(
            err.to_string()
                .contains("captured length 500 runs past its block of 60 bytes"),
            "{err}"
        );
    }

    #[test]
    fn a_block_whose_trailing_length_disagrees_is_corrupt() {
        let mut input = shb(true);
        input.extend(idb(linktype::RAW, 0, true));
        input.extend(packet_block(0, &ipv4(1), true));
        let at = input.len() as u64;
        let mut bad = block(0x4242_4242, &[0; 8], true);
        bad[16..20].copy_from_slice(&[0, 0, 0, 24]);
        input.extend(bad);
        input.extend(packet_block(0, &ipv4(2), true));
        let outcome = read(&input);
        assert_eq!(outcome.packets, vec![ipv4(1)]);
        let err = outcome.error.unwrap();
        assert_eq!((err.kind(), err.offset()), ("corrupt", Some(at)));
        assert!(
            err.to_string()
                .contains("trailing length 24 disagrees with its length 20"),
            "{err}"
        );
    }

    #[test]
    fn a_malformed_block_of_a_type_not_decoded_is_skipped_and_counted() {
        // A name resolution block whose record length runs past the block: pcap-parser rejects it, but it
        // is well framed and says nothing about the packets around it.
        let mut input = shb(false);
        input.extend(idb(linktype::RAW, 0, false));
        input.extend(epb(0, &ipv4(1), false));
        input.extend(block(4, &[1, 0, 200, 0, 10, 0, 0, 1], false));
        input.extend(epb(0, &ipv4(2), false));
        let outcome = read(&input);
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(outcome.packets, vec![ipv4(1), ipv4(2)]);
        assert_eq!(outcome.stats.undecoded_blocks, BTreeMap::from([(4, 1)]));
    }

    // ---- corrupt lengths ----

    #[test]
    fn a_record_claiming_gigabytes_is_corrupt_after_the_frames_before_it() {
        for (claimed, be) in [(1_400_000_000u32, false), (3_900_000_000, true), (300_000, false)] {
            let packets: Vec<Vec<u8>> = (0..5).map(|i| ipv4(i as u8)).collect();
            let mut input = pcap_with(0xa1b2_c3d4, be, 101, &packets);
            let at = input.len() as u64;
            for v in [1_700_000_000, 0, claimed, claimed] {
                w32(&mut input, v, be);
            }
            input.extend(vec![0x45; 1000]);
            let outcome = read(&input);
            assert_eq!(outcome.packets, packets);
            let err = outcome.error.expect("an error");
            assert_eq!((err.kind(), err.offset()), ("record_too_large", Some(at)));
            assert_eq!(
                err.to_string(),
                format!(
                    "corrupt capture at byte offset {at}: the record claims {claimed} bytes, more than 262144 \
                     (the largest record this reader accepts)"
                )
            );
        }
        // A file snap length above 256 KiB raises the bound up to `max_record`.
        let mut input = pcap(101, &[]);
        input[16..20].copy_from_slice(&1_000_000u32.to_le_bytes());
        input.extend_from_slice(&[0; 8]);
        input.extend_from_slice(&2_000_000u32.to_le_bytes());
        input.extend_from_slice(&2_000_000u32.to_le_bytes());
        let err = read(&input).error.unwrap();
        assert!(
            err.to_string()
                .contains("claims 2000000 bytes, more than 1000000"),
            "{err}"
        );
        // pcapng: a block length above `max_record`.
        let mut ng = shb(false);
        ng.extend(idb(linktype::RAW, 0, false));
        ng.extend(epb(0, &ipv4(1), false));
        let at = ng.len() as u64;
        ng.extend([6, 0, 0, 0]);
        ng.extend(0xf000_0000u32.to_le_bytes());
        ng.extend(vec![0; 100]);
        let outcome = read(&ng);
        assert_eq!(outcome.packets, vec![ipv4(1)]);
        let err = outcome.error.unwrap();
        assert_eq!((err.kind(), err.offset()), ("record_too_large", Some(at)));
        assert!(
            err.to_string()
                .contains("claims 4026531840 bytes, more than 16777216"),
            "{err}"
        );
    }

    #[test]
    fn a_captured_length_past_the_end_comes_after_the_frames_before_it() {
        // Small and large files (beyond the read buffer), records shorter and longer than the buffer.
        for (count, claimed) in [(3usize, 100u32), (3, 200_000), (10_000, 100), (10_000, 200_000)] {
            let packets: Vec<Vec<u8>> = (0..count).map(|i| ipv4(i as u8)).collect();
            let mut input = pcap(101, &packets);
            input[16..20].copy_from_slice(&262_144u32.to_le_bytes()); // the snap length
            let at = input.len() as u64;
            for v in [1_700_000_000, 0, claimed, claimed] {
                w32(&mut input, v, false);
            }
            input.extend(vec![0x45; 50]);
            let outcome = read_with(&input, small_buffer()).unwrap();
            assert_eq!(outcome.packets.len(), count, "{count} {claimed}");
            let err = outcome.error.expect("an error");
            assert_eq!((err.kind(), err.offset()), ("truncated", Some(at)), "{err}");
            assert_eq!(outcome.stats.frames, count as u64);
        }
    }

    #[test]
    fn a_cut_record_whose_header_is_implausible_is_corrupt_not_truncated() {
        let packets = vec![ipv4(1), ipv4(2)];
        for (caplen, origlen, detail) in [
            (
                60_000u32,
                100u32,
                "the record claims 60000 captured bytes of a 100-byte packet",
            ),
            (
                70_000,
                70_000,
                "the record claims 70000 captured bytes, more than the file's snap length 65535",
            ),
        ] {
            let mut input = pcap(101, &packets);
            let at = input.len() as u64;
            for v in [1_700_000_000, 0, caplen, origlen] {
                w32(&mut input, v, false);
            }
            input.extend(vec![0x45; 40]);
            let outcome = read(&input);
            assert_eq!(outcome.packets, packets);
            let err = outcome.error.unwrap();
            assert_eq!((err.kind(), err.offset()), ("corrupt", Some(at)));
            assert_eq!(
                err.to_string(),
                format!(
                    "corrupt capture at byte offset {at}: {detail}, and the file ends at byte {}",
                    at + 56
                )
            );
        }
    }

    fn small_buffer() -> ReaderOptions {
        ReaderOptions {
            buffer_capacity: 4096,
            ..ReaderOptions::default()
        }
    }

    // ---- gzip ----

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn gzip_compressed_captures_are_streamed() {
        let packets: Vec<Vec<u8>> = (0..3000)
            .map(|i| if i % 3 == 0 { ipv6(i as u8) } else { ipv4(i as u8) })
            .collect();
        let plain = pcap(101, &packets);
        let compressed = gzip(&plain);
        let reader = CaptureReader::new(compressed.as_slice()).unwrap();
        assert_eq!(reader.compression(), Some("gzip"));
        assert_eq!(reader.format().name(), "pcap");
        let outcome = read_with(&compressed, small_buffer()).unwrap();
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(outcome.packets, packets);
        // Served 3 bytes at a time, and as two gzip members (as `cat a.gz b.gz` makes).
        let mut reader = CaptureReader::new(Flaky {
            data: &compressed,
            chunk: 3,
            fail: None,
        })
        .unwrap();
        let mut batch = Batch::default();
        let mut total = 0;
        while reader.next_batch(&mut batch).unwrap() {
            total += batch.len();
        }
        assert_eq!(total, packets.len());
        let (first, second) = plain.split_at(1000);
        let members = [gzip(first), gzip(second)].concat();
        assert_eq!(read(&members).packets, packets);

        let mut ng = shb(true);
        ng.extend(idb(linktype::ETHERNET, 0, true));
        ng.extend(epb(0, &ethernet(0x0800, &[], &ipv4(1)), true));
        let outcome = read(&gzip(&ng));
        assert_eq!(outcome.packets, vec![ipv4(1)]);
        assert!(CaptureReader::new(plain.as_slice())
            .unwrap()
            .compression()
            .is_none());
    }

    #[test]
    fn a_cut_or_corrupt_gzip_stream_comes_after_the_packets_before_it() {
        let packets: Vec<Vec<u8>> = (0..3000).map(|i| ipv4(i as u8)).collect();
        let compressed = gzip(&pcap(101, &packets));
        let outcome = read_with(&compressed[..compressed.len() / 2], small_buffer()).unwrap();
        assert!(!outcome.packets.is_empty() && outcome.packets.len() < packets.len());
        assert_eq!(outcome.packets, packets[..outcome.packets.len()]);
        let err = outcome.error.unwrap();
        assert_eq!(err.kind(), "truncated");
        assert!(
            err.to_string()
                .starts_with("truncated gzip stream: it ends after "),
            "{err}"
        );

        let mut bad = compressed.clone();
        let n = bad.len();
        bad[n - 8] ^= 0xff; // the CRC
        let outcome = read_with(&bad, small_buffer()).unwrap();
        assert_eq!(outcome.packets, packets);
        let err = outcome.error.unwrap();
        assert_eq!(err.kind(), "corrupt");
        assert!(err.to_string().starts_with("corrupt gzip stream after "), "{err}");

        // Not even a whole gzip header; gzip of something that is not a capture.
        assert_eq!(
            CaptureReader::new(&[0x1f, 0x8b, 8][..]).unwrap_err().kind(),
            "truncated"
        );
        let err = CaptureReader::new(gzip(b"hello, world").as_slice()).unwrap_err();
        assert_eq!(err.kind(), "not_a_capture");
    }

    #[test]
    fn other_compressions_are_named() {
        let err = CaptureReader::new(&[0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0][..]).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("it looks zstd-compressed: decompress it first"),
            "{err}"
        );
    }

    // ---- encapsulations ----

    #[test]
    fn encapsulations_are_counted_per_link_type() {
        let mpls = |payload: &[u8]| [&[0, 0x10, 0x01, 64][..], payload].concat();
        let frames = vec![
            ethernet(0x8847, &[], &mpls(&ipv4(1))),
            ethernet(0x8847, &[0x8100], &mpls(&ipv6(2))),
            ethernet(
                0x8864,
                &[0x88a8, 0x8100],
                &[&[0x11, 0, 0, 1, 0, 30, 0, 0x21][..], &ipv4(3)].concat(),
            ),
            ethernet(0x0800, &[], &ipv4(4)),
            arp(),
        ];
        let outcome = read(&pcap(1, &frames));
        assert_eq!(outcome.packets, vec![ipv4(1), ipv6(2), ipv4(3), ipv4(4)]);
        assert_eq!(
            outcome.stats.encapsulations,
            BTreeMap::from([
                ((1, Encapsulation::Vlan), 2),
                ((1, Encapsulation::Qinq), 1),
                ((1, Encapsulation::Mpls), 2),
                ((1, Encapsulation::Pppoe), 1),
            ])
        );
    }

    // ---- totality ----

    fn drain(input: &[u8], options: ReaderOptions) {
        if let Ok(outcome) = read_with(input, options) {
            let s = &outcome.stats;
            assert_eq!(
                s.frames,
                s.ip_packets + s.non_ip_frames + s.short_frames + s.unsupported_link_frames
            );
            assert_eq!(s.ip_packets, outcome.packets.len() as u64);
            assert!(outcome.batches.iter().all(|&n| n <= options.batch_packets));
        }
    }

    fn small() -> ReaderOptions {
        ReaderOptions {
            batch_packets: 3,
            batch_bytes: 64,
            buffer_capacity: 4096,
            max_record: 8192,
        }
    }

    /// Prefixes that reach record parsing: every pcap header flavour, and pcapng headers with interfaces.
    fn prefix() -> impl Strategy<Value = Vec<u8>> {
        let links = prop::sample::select(vec![0u32, 1, 12, 101, 108, 113, 228, 229, 276, 105]);
        prop_oneof![
            Just(vec![]),
            (links.clone(), any::<bool>(), any::<bool>()).prop_map(|(link, be, ns)| {
                pcap_with(if ns { 0xa1b2_3c4d } else { 0xa1b2_c3d4 }, be, link, &[])
            }),
            (links, any::<bool>()).prop_map(|(link, be)| {
                let mut out = shb(be);
                out.extend(idb(link as u16, 64, be));
                out
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn any_input_terminates_without_panicking(
            prefix in prefix(),
            tail in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let input = [prefix, tail].concat();
            drain(&input, small());
            drain(&input, ReaderOptions::default());
        }

        #[test]
        fn a_capture_cut_anywhere_yields_a_prefix_of_its_packets(
            count in 0usize..12,
            ng in any::<bool>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let packets: Vec<Vec<u8>> = (0..count).map(|i| if i % 2 == 0 { ipv4(i as u8) } else { ipv6(i as u8) }).collect();
            let input = if ng {
                let mut out = shb(false);
                out.extend(idb(linktype::RAW, 0, false));
                for p in &packets {
                    out.extend(epb(0, p, false));
                }
                out
            } else {
                pcap(101, &packets)
            };
            let cut = cut.index(input.len() + 1);
            if let Ok(outcome) = read_with(&input[..cut], small()) {
                prop_assert!(outcome.packets.len() <= packets.len());
                prop_assert_eq!(&outcome.packets[..], &packets[..outcome.packets.len()]);
                if cut == input.len() {
                    prop_assert!(outcome.error.is_none());
                    prop_assert_eq!(outcome.packets.len(), packets.len());
                }
            }
        }
    }
}
