//! Destination keys: `10.0.0.1:80`, `[2001:db8::1]:443`, or the bare address when there is no port.
//!
//! IPv6 text is RFC 5952 (Rust's `Ipv6Addr` display: lower case, longest zero run compressed, IPv4-mapped
//! addresses as `::ffff:1.2.3.4`). IPv4 is formatted by hand because it is the hot case.

use core::fmt::{self, Write};
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::parse::Destination;

/// Longest key: `[` + 45-character IPv6 text + `]:65535`.
pub const MAX_KEY_LEN: usize = 1 + 45 + 7;

/// A destination key or address text on the stack (no allocation); `as_str` gives the text.
#[derive(Clone, Copy)]
pub struct KeyText {
    buf: [u8; MAX_KEY_LEN],
    len: usize,
}

impl KeyText {
    pub const fn new() -> Self {
        KeyText {
            buf: [0; MAX_KEY_LEN],
            len: 0,
        }
    }

    #[inline]
    pub fn as_str(&self) -> &str {
        // SAFETY: only whole `&str`s are ever copied in (`write_str`), so `buf[..len]` is valid UTF-8.
        unsafe { core::str::from_utf8_unchecked(&self.buf[..self.len]) }
    }
}

impl Default for KeyText {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for KeyText {
    #[inline]
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Appends the decimal text of `value`.
#[inline]
fn push_decimal<W: Write>(out: &mut W, value: u16) -> fmt::Result {
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
    out.write_str(core::str::from_utf8(&digits[i..]).unwrap_or_default())
}

/// Appends dotted-quad text of an IPv4 address.
#[inline]
pub fn push_ipv4<W: Write>(out: &mut W, addr: Ipv4Addr) -> fmt::Result {
    let [a, b, c, d] = addr.octets();
    push_decimal(out, a.into())?;
    out.write_char('.')?;
    push_decimal(out, b.into())?;
    out.write_char('.')?;
    push_decimal(out, c.into())?;
    out.write_char('.')?;
    push_decimal(out, d.into())
}

/// Appends lower-case hex without leading zeros.
#[inline]
fn push_hex<W: Write>(out: &mut W, value: u16) -> fmt::Result {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 4];
    let mut i = text.len();
    let mut n = value;
    loop {
        i -= 1;
        text[i] = DIGITS[usize::from(n & 0xf)];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    // Only ASCII hex digits were written.
    out.write_str(core::str::from_utf8(&text[i..]).unwrap_or_default())
}

/// Appends `segments` joined by `:`.
#[inline]
fn push_segments<W: Write>(out: &mut W, segments: &[u16]) -> fmt::Result {
    for (i, &segment) in segments.iter().enumerate() {
        if i > 0 {
            out.write_char(':')?;
        }
        push_hex(out, segment)?;
    }
    Ok(())
}

/// Appends the RFC 5952 text of an IPv6 address: lower case, no leading zeros, the first longest run of two
/// or more zero groups as `::`, IPv4-mapped addresses as `::ffff:a.b.c.d`. Same output as std's `Display`
/// (checked by a property test), several times faster.
#[inline]
pub fn push_ipv6<W: Write>(out: &mut W, addr: Ipv6Addr) -> fmt::Result {
    if let Some(v4) = addr.to_ipv4_mapped() {
        out.write_str("::ffff:")?;
        return push_ipv4(out, v4);
    }
    let segments = addr.segments();
    let (mut best_start, mut best_len, mut run_start, mut run_len) = (0, 0, 0, 0);
    for (i, &segment) in segments.iter().enumerate() {
        if segment == 0 {
            if run_len == 0 {
                run_start = i;
            }
            run_len += 1;
            if run_len > best_len {
                (best_start, best_len) = (run_start, run_len);
            }
        } else {
            run_len = 0;
        }
    }
    if best_len < 2 {
        return push_segments(out, &segments);
    }
    push_segments(out, &segments[..best_start])?;
    out.write_str("::")?;
    push_segments(out, &segments[best_start + best_len..])
}

/// Appends the RFC 5952 text of an address.
#[inline]
pub fn push_addr<W: Write>(out: &mut W, addr: IpAddr) -> fmt::Result {
    match addr {
        IpAddr::V4(v4) => push_ipv4(out, v4),
        IpAddr::V6(v6) => push_ipv6(out, v6),
    }
}

/// Appends the destination key.
#[inline]
pub fn push_key<W: Write>(out: &mut W, dest: &Destination) -> fmt::Result {
    match (dest.addr, dest.port) {
        (addr, None) => push_addr(out, addr),
        (IpAddr::V4(v4), Some(port)) => {
            push_ipv4(out, v4)?;
            out.write_char(':')?;
            push_decimal(out, port)
        }
        (IpAddr::V6(v6), Some(port)) => {
            out.write_char('[')?;
            push_ipv6(out, v6)?;
            out.write_str("]:")?;
            push_decimal(out, port)
        }
    }
}

/// The RFC 5952 text of an address, on the stack.
#[inline]
pub fn addr_text(addr: IpAddr) -> KeyText {
    let mut out = KeyText::new();
    // Any address fits: MAX_KEY_LEN covers the longest key, which contains the longest address.
    let _ = push_addr(&mut out, addr);
    out
}

impl Destination {
    /// The destination key, on the stack.
    #[inline]
    pub fn key_text(&self) -> KeyText {
        let mut out = KeyText::new();
        // The longest key is MAX_KEY_LEN bytes, so this cannot run out of room.
        let _ = push_key(&mut out, self);
        out
    }

    /// The destination key as a new string.
    pub fn key(&self) -> String {
        self.key_text().as_str().to_owned()
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        push_key(f, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(addr: &str, port: Option<u16>) -> String {
        Destination {
            addr: addr.parse().unwrap(),
            port,
        }
        .key()
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
        for n in [
            0u32, 1, 0x0a000001, 0x7f000001, 0xc0a80101, 0xffffffff, 0x01020304, 0x64006400,
        ] {
            let a = Ipv4Addr::from(n);
            assert_eq!(addr_text(IpAddr::V4(a)).as_str(), a.to_string());
        }
        let longest = key("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some(65535));
        assert!(longest.len() <= MAX_KEY_LEN);
        let widest_mixed = Ipv6Addr::from([0, 0, 0, 0, 0, 0xffff, 0xffff, 0xffff]);
        let text = Destination {
            addr: IpAddr::V6(widest_mixed),
            port: Some(65535),
        }
        .key();
        assert_eq!(text, "[::ffff:255.255.255.255]:65535");
        assert_eq!(
            Destination {
                addr: IpAddr::V6(widest_mixed),
                port: None
            }
            .to_string(),
            &text[1..23]
        );
    }
}
