//! Property tests: the parser is total (never panics, terminates) and its answers are self-consistent.

use proptest::prelude::*;
use vpn_packet_core::{extract, group_by_destination, protocol_has_ports, split_by_lengths, ParseError};

/// Bytes biased towards IP headers so the extension-header walk gets deep.
fn ip_like() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..128),
        (
            prop::sample::select(vec![0x45u8, 0x46, 0x4f, 0x60]),
            proptest::collection::vec(any::<u8>(), 0..200)
        )
            .prop_map(|(first, rest)| [vec![first], rest].concat()),
        (
            proptest::collection::vec(any::<u8>(), 5),
            prop::sample::select(vec![0u8, 43, 44, 51, 60, 6, 17]),
            proptest::collection::vec(
                prop::sample::select(vec![0u8, 1, 6, 17, 43, 44, 51, 60, 255]),
                33..300
            ),
        )
            .prop_map(|(head, next, rest)| [vec![0x60], head, vec![next], rest].concat()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn extract_is_total_and_consistent(packet in ip_like()) {
        match extract(&packet) {
            Ok(summary) => {
                prop_assert_eq!(summary.version(), packet[0] >> 4);
                prop_assert_eq!(summary.src.is_ipv4(), summary.dst.is_ipv4());
                prop_assert_eq!(summary.src_port.is_some(), summary.dst_port.is_some());
                if summary.dst_port.is_some() {
                    prop_assert!(protocol_has_ports(summary.protocol));
                }
                let key = summary.destination().key();
                prop_assert!(key.len() <= vpn_packet_core::key::MAX_KEY_LEN);
            }
            Err(ParseError::Empty) => prop_assert!(packet.is_empty()),
            Err(err) => prop_assert!(!err.to_string().is_empty()),
        }
    }

    #[test]
    fn source_agrees_with_extract(packet in ip_like()) {
        prop_assert_eq!(vpn_packet_core::source(&packet), extract(&packet).map(|s| s.src));
    }

    #[test]
    fn truncation_never_changes_addresses(packet in ip_like(), cut in 0usize..300) {
        if let Ok(whole) = extract(&packet) {
            let fixed = if whole.version() == 4 { 20 } else { 40 };
            let cut = cut.clamp(fixed, packet.len());
            let part = extract(&packet[..cut]).expect("a packet cut after its fixed header still parses");
            prop_assert_eq!((part.src, part.dst), (whole.src, whole.dst));
        }
    }

    #[test]
    fn grouping_partitions_the_batch(packets in proptest::collection::vec(ip_like(), 0..40)) {
        let grouped = group_by_destination(packets.iter().map(Vec::as_slice));
        let mut seen: Vec<usize> = grouped.rejected.iter().map(|(i, _)| *i).collect();
        for group in &grouped.groups {
            prop_assert!(group.members.windows(2).all(|w| w[0] < w[1]));
            for &i in &group.members {
                prop_assert_eq!(extract(&packets[i]).unwrap().destination(), group.destination);
            }
            seen.extend(&group.members);
        }
        seen.sort_unstable();
        prop_assert_eq!(seen, (0..packets.len()).collect::<Vec<_>>());
    }

    #[test]
    fn split_is_exact_or_refused(buffer in proptest::collection::vec(any::<u8>(), 0..64), lengths in proptest::collection::vec(0usize..40, 0..8)) {
        match split_by_lengths(&buffer, &lengths) {
            Ok(parts) => {
                prop_assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), lengths.clone());
                prop_assert_eq!(parts.concat(), buffer[..lengths.iter().sum::<usize>()].to_vec());
            }
            Err(err) => prop_assert!(err.needed > err.available),
        }
    }
}

/// IPv6 addresses with many zero groups, so every run length and position of `::` is exercised.
fn sparse_ipv6() -> impl Strategy<Value = core::net::Ipv6Addr> {
    proptest::array::uniform8(prop_oneof![3 => Just(0u16), 1 => any::<u16>(), 1 => 0u16..16])
        .prop_map(core::net::Ipv6Addr::from)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn ipv6_text_matches_std(addr in sparse_ipv6(), port in proptest::option::of(any::<u16>())) {
        use core::net::IpAddr;
        use vpn_packet_core::Destination;
        let text = vpn_packet_core::key::addr_text(IpAddr::V6(addr));
        prop_assert_eq!(text.as_str(), addr.to_string());
        let key = Destination { addr: IpAddr::V6(addr), port }.key();
        let expected = match port { Some(p) => format!("[{addr}]:{p}"), None => addr.to_string() };
        prop_assert_eq!(key, expected);
    }
}
