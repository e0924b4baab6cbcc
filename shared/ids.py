"""Random ids as text."""

from __future__ import annotations

import os

_POOL_BYTES = 4096  # 256 ids per read of the OS's random source


class _Entropy:
    """Bytes from os.urandom, read 4 KiB at a time (a child after fork reads its own)."""

    def __init__(self) -> None:
        self.pool = b""
        self.at = 0

    def take16(self) -> bytes:
        if self.at + 16 > len(self.pool):
            self.pool = os.urandom(_POOL_BYTES)
            self.at = 0
        chunk = self.pool[self.at : self.at + 16]
        self.at += 16
        return chunk

    def forget(self) -> None:
        self.pool = b""
        self.at = 0


_ENTROPY = _Entropy()
os.register_at_fork(after_in_child=_ENTROPY.forget)


def random_uuid() -> str:
    """A random (version 4) UUID in its canonical text, as `str(uuid.uuid4())` gives, from
    the same source (os.urandom), in about a third of the time: a runtime makes two or three
    per command (event ids)."""
    raw = bytearray(_ENTROPY.take16())
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    x = raw.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"
