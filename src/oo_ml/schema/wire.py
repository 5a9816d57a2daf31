"""Protobuf wire-format pieces for code that writes a message's bytes itself.

Where building a message field by field costs measurably (the response's features, a
learned state's arrays), the bytes are assembled directly; this is the one copy of the
encoding they share.
"""

from __future__ import annotations


def varint(n: int) -> bytes:
    """`n` (>= 0) as a base-128 varint, low group first."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    """A field's key: its number and wire type (0 varint, 1 fixed64, 2 length-delimited)."""
    return varint(number << 3 | wire_type)


def delimited(key: bytes, body: bytes) -> bytes:
    """A length-delimited field (a string, bytes, a packed array, a message): `key` from
    `tag(number, 2)`, then the length, then the body."""
    return key + varint(len(body)) + body
