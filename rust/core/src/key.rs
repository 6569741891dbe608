//! Destination keys: `10.0.0.1:80`, `[2001:db8::1]:443`, or the bare address when there is no port.
//!
//! IPv6 text is RFC 5952 (Rust's `Ipv6Addr` display: lower case, longest zero run compressed, IPv4-mapped
//! addresses as `::ffff:1.2.3.4`). IPv4 is formatted by hand because it is the hot case.

use core::fmt::{self, Write};
use core::net::{IpAddr, Ipv4Addr};

use crate::parse::Destination;

/// Longest key: `[` + 45-character IPv6 text + `]:65535`.
pub const MAX_KEY_LEN: usize = 1 + 45 + 7;

/// Appends the decimal text of `value` to `out`.
#[inline]
fn push_decimal(out: &mut String, value: u16) {
    let mut digits = [0u8; 5];
    let mut n = value;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    out.push_str(core::str::from_utf8(&digits[i..]).unwrap_or_default());
}

/// Appends dotted-quad text of an IPv4 address.
#[inline]
pub fn push_ipv4(out: &mut String, addr: Ipv4Addr) {
    let [a, b, c, d] = addr.octets();
    push_decimal(out, a.into());
    out.push('.');
    push_decimal(out, b.into());
    out.push('.');
    push_decimal(out, c.into());
    out.push('.');
    push_decimal(out, d.into());
}

/// Appends the RFC 5952 text of an address.
#[inline]
pub fn push_addr(out: &mut String, addr: IpAddr) {
    match addr {
        IpAddr::V4(v4) => push_ipv4(out, v4),
        // Writing to a String cannot fail.
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// Appends the destination key.
#[inline]
pub fn push_key(out: &mut String, dest: &Destination) {
    match (dest.addr, dest.port) {
        (addr, None) => push_addr(out, addr),
        (IpAddr::V4(v4), Some(port)) => {
            push_ipv4(out, v4);
            out.push(':');
            push_decimal(out, port);
        }
        (IpAddr::V6(v6), Some(port)) => {
            out.push('[');
            let _ = write!(out, "{v6}");
            out.push_str("]:");
            push_decimal(out, port);
        }
    }
}

/// The RFC 5952 text of an address as a new string.
pub fn addr_text(addr: IpAddr) -> String {
    let mut out = String::with_capacity(45);
    push_addr(&mut out, addr);
    out
}

impl Destination {
    /// The destination key as a new string.
    pub fn key(&self) -> String {
        let mut out = String::with_capacity(MAX_KEY_LEN);
        push_key(&mut out, self);
        out
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::Ipv6Addr;

    fn key(addr: &str, port: Option<u16>) -> String {
        Destination { addr: addr.parse().unwrap(), port }.key()
    }

    #[test]
    fn formats() {
        assert_eq!(key("10.0.0.1", Some(80)), "10.0.0.1:80");
        assert_eq!(key("0.0.0.0", Some(0)), "0.0.0.0:0");
        assert_eq!(key("255.255.255.255", Some(65535)), "255.255.255.255:65535");
        assert_eq!(key("10.0.0.1", None), "10.0.0.1");
        assert_eq!(key("2001:db8::1", Some(443)), "[2001:db8::1]:443");
        assert_eq!(key("2001:db8::2", None), "2001:db8::2");
        assert_eq!(key("::ffff:1.2.3.4", Some(53)), "[::ffff:1.2.3.4]:53");
        assert_eq!(key("2001:db8:0:0:1:0:0:1", None), "2001:db8::1:0:0:1");
        assert_eq!(key("2001:db8:0:1:1:1:1:1", None), "2001:db8:0:1:1:1:1:1");
        assert_eq!(key("::", None), "::");
    }

    #[test]
    fn ipv4_matches_std_display() {
        for n in [0u32, 1, 0x0a000001, 0x7f000001, 0xc0a80101, 0xffffffff, 0x01020304, 0x64006400] {
            let a = Ipv4Addr::from(n);
            assert_eq!(addr_text(IpAddr::V4(a)), a.to_string());
        }
        assert!(MAX_KEY_LEN >= key("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255", Some(65535)).len());
        let _ = Ipv6Addr::LOCALHOST;
    }
}
