//! Streaming pcap/pcapng reading: link-layer frames to raw IP packets, for `vpn-packet inspect`.
