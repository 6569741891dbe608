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
pub use parse::{destination, extract, protocol_has_ports, Destination, PacketSummary, ParseError};
