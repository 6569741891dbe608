//! vpn-packet core: pure Rust, no Python. IP header extraction, destination keys and batch grouping.
//!
//! Every function here is total: it returns a value or an error for any input, and never panics.

pub mod batch;
pub mod capture;
pub mod key;
pub mod parse;

pub use batch::{
    group_by_destination, split_by_lengths, tally_by_destination, Group, Grouped, SplitError, Tally,
};
pub use parse::{destination, extract, protocol_has_ports, source, Destination, PacketSummary, ParseError};

pub mod ack;
pub mod ed25519;
pub mod framing;
pub mod gso;
pub mod handshake;
pub mod inbound;
pub mod prefix;

pub mod connection;
pub mod key_checks;
pub mod tls;

pub use framing::{encode_frames, encode_frames_into, FrameDecoder, FrameKind, FramingError};
pub use handshake::{Answer, HandshakeError, Hello, Parsed};
pub use prefix::{check_source, parse_prefix, source_address, PrefixError, PrefixTable, SourceCheck};

pub mod data_plane;
pub mod ledger;
pub mod queues;
pub mod receive;
pub mod send;
pub mod tun;
pub use queues::{DestinationQueues, KeyedPush, Pushed, QueueId, Rejections, OFFLOAD_FLAG, VNET_HDR_LEN};
