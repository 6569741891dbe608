"""Ed25519 public keys no key generator makes, and the forgery they allow, for the tests of the strict
key and signature checks (`rust/core/src/ed25519.rs`).

- `small_order_keys()`: every encoding of the eight points of small order: the canonical one, the sign bit
  flipped, and `y + p` where it fits in 255 bits (32 zero bytes is one of them).
- `mixed_order_key(public_key, torsion)`: an honest key plus a torsion point: a point outside the
  prime-order subgroup, one of eight public strings for the same private key.
- `FORGED_SIGNATURE`: `R` = the identity point, `s` = 0. Under a small-order key `A`, the lax equation
  `[s]B = R + [k]A` holds whenever `[k]A` is the identity (one message in four or eight): the forgery of the
  weak-key issue, made without any private key.

The curve arithmetic is plain integers (affine twisted Edwards coordinates): slow, obvious, test-only, and
independent of the native code under test.
"""

from __future__ import annotations

from typing import Final

__all__ = ["FORGED_SIGNATURE", "mixed_order_key", "small_order_keys", "torsion_points"]

_P: Final = 2**255 - 19
_D: Final = -121665 * pow(121666, -1, _P) % _P
_SQRT_M1: Final = pow(2, (_P - 1) // 4, _P)

Point = tuple[int, int]

FORGED_SIGNATURE: Final = bytes([1]) + bytes(63)  # R = identity (y = 1), s = 0


def _x_of(y: int, sign: int) -> int | None:
    """The x with this sign bit of a point with this y (RFC 8032, 5.1.3), None when there is none."""
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x2 = u * pow(v, -1, _P) % _P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return None
    return _P - x if x & 1 != sign else x


def decode(encoding: bytes) -> Point:
    """The point of a canonical encoding (ValueError for bytes that are no point)."""
    value = int.from_bytes(encoding, "little")
    y, sign = value & ((1 << 255) - 1), value >> 255
    x = _x_of(y, sign)
    if x is None or y >= _P:
        raise ValueError("not a canonical point encoding")
    return x, y


def encode(point: Point) -> bytes:
    x, y = point
    return (y | (x & 1) << 255).to_bytes(32, "little")


def add(a: Point, b: Point) -> Point:
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    x3 = (x1 * y2 + y1 * x2) * pow(1 + t, -1, _P) % _P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, -1, _P) % _P
    return x3, y3


def _times(n: int, point: Point) -> Point:
    out: Point = (0, 1)
    for _ in range(n):
        out = add(out, point)
    return out


def torsion_points() -> list[Point]:
    """The eight points of order dividing 8: the multiples of one point of order 8 (its published
    encoding; that it has order 8 is checked here, not taken on trust)."""
    generator = decode(bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"))
    points = [_times(k, generator) for k in range(8)]
    if len(set(points)) != 8 or _times(8, generator) != (0, 1):
        raise AssertionError("not a generator of the 8-torsion")
    return points


def small_order_keys() -> list[bytes]:
    """Every encoding of every small-order point (canonical, sign flipped, y + p), without duplicates."""
    out: list[bytes] = []
    for point in torsion_points():
        canonical = encode(point)
        flipped = canonical[:31] + bytes([canonical[31] ^ 0x80])
        for encoding in (canonical, flipped):
            value = int.from_bytes(encoding, "little")
            y, sign = value & ((1 << 255) - 1), value >> 255
            candidates = [encoding]
            if y + _P < 1 << 255:
                candidates.append((y + _P | sign << 255).to_bytes(32, "little"))
            out.extend(c for c in candidates if c not in out)
    return out


def mixed_order_key(public_key: bytes, torsion: int) -> bytes:
    """`public_key` plus the `torsion`-th small-order point (1..7): a valid point of mixed order."""
    if not 1 <= torsion <= 7:
        raise ValueError("torsion is 1..7 (0 is the identity: the key itself)")
    return encode(add(decode(public_key), torsion_points()[torsion]))
