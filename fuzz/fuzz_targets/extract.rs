//! Fuzzes extraction, key formatting and batch grouping: none may panic, and answers must be consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vpn_packet_core::{extract, group_by_destination, protocol_has_ports};

fuzz_target!(|data: &[u8]| {
    if let Ok(summary) = extract(data) {
        assert_eq!(summary.version(), data[0] >> 4);
        assert_eq!(summary.src_port.is_some(), summary.dst_port.is_some());
        assert!(summary.dst_port.is_none() || protocol_has_ports(summary.protocol));
        let key = summary.destination().key();
        assert!(key.len() <= vpn_packet_core::key::MAX_KEY_LEN);
    }
    // The same bytes split into a few packets at data-derived boundaries.
    let cut = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let grouped = group_by_destination([&data[..cut], &data[cut..], data]);
    assert_eq!(grouped.groups.iter().map(|g| g.members.len()).sum::<usize>() + grouped.rejected.len(), 3);
});
