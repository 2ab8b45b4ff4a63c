"""
Bounded decoding of compressed response bodies, for reading only.

The client always receives the original bytes; the usage readers see them
decoded, one layer (gzip, deflate, and brotli / zstd where their packages are
installed), in pieces of at most L{PIECE} bytes, so a decompression bomb cannot
make one call hold more than a piece.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterator

#: The most decoded bytes produced at once.
PIECE = 65536


class Undecodable(Exception):
    """The body cannot be decoded (bad data, or no decoder for its encoding)."""


class Decoder(ABC):
    """Turns wire bytes into decoded pieces."""

    @abstractmethod
    def decode(self, data: bytes) -> Iterator[bytes]:
        """The decoded pieces of the next wire bytes, each at most L{PIECE} long."""


class Identity(Decoder):
    def decode(self, data: bytes) -> Iterator[bytes]:
        yield data


class Zlib(Decoder):
    """gzip (C{wbits=31}) or deflate: zlib-wrapped as RFC 9110 says, raw as some servers send."""

    def __init__(self, gzip: bool) -> None:
        self._gzip = gzip
        self._inflate: Any = zlib.decompressobj(wbits=31 if gzip else 15)
        self._started = False

    def decode(self, data: bytes) -> Iterator[bytes]:
        if not self._started and not self._gzip and data:
            self._started = True
            # "deflate" is meant to be zlib-wrapped, but raw deflate is common.
            if (data[0] & 0x0F) != 8 or ((data[0] << 8) | (data[1] if len(data) > 1 else 0x9C)) % 31:
                self._inflate = zlib.decompressobj(wbits=-15)
        try:
            piece = self._inflate.decompress(data, PIECE)
            yield piece
            while self._inflate.unconsumed_tail:
                piece = self._inflate.decompress(self._inflate.unconsumed_tail, PIECE)
                yield piece
        except zlib.error as e:
            raise Undecodable(str(e)) from None


class Brotli(Decoder):
    def __init__(self) -> None:
        import brotli

        self._brotli = brotli
        self._decompressor = brotli.Decompressor()

    def decode(self, data: bytes) -> Iterator[bytes]:
        try:
            yield self._decompressor.process(data, output_buffer_limit=PIECE)
            while not self._decompressor.can_accept_more_data():
                yield self._decompressor.process(b"", output_buffer_limit=PIECE)
        except self._brotli.error as e:
            raise Undecodable(str(e)) from None


class Zstd(Decoder):
    """zstd, fed in small slices so one slice's output stays small."""

    SLICE = 512

    def __init__(self) -> None:
        import zstandard

        self._zstd = zstandard
        self._decompressor = zstandard.ZstdDecompressor().decompressobj()

    def decode(self, data: bytes) -> Iterator[bytes]:
        try:
            for start in range(0, len(data), self.SLICE):
                yield self._decompressor.decompress(data[start : start + self.SLICE])
        except self._zstd.ZstdError as e:
            raise Undecodable(str(e)) from None


def _brotli() -> Decoder:
    return Brotli()


def _zstd() -> Decoder:
    return Zstd()


_DECODERS: dict[bytes, Callable[[], Decoder]] = {
    b"": Identity,
    b"identity": Identity,
    b"gzip": lambda: Zlib(gzip=True),
    b"x-gzip": lambda: Zlib(gzip=True),
    b"deflate": lambda: Zlib(gzip=False),
    b"br": _brotli,
    b"zstd": _zstd,
}


def decoderFor(contentEncoding: bytes | None) -> Decoder:
    """
    The decoder for a C{Content-Encoding} value.

    @raise Undecodable: more than one layer, an unknown encoding, or a codec
        whose package is not installed.
    """
    encoding = (contentEncoding or b"").strip().lower()
    if b"," in encoding:
        raise Undecodable(f"more than one content coding: {encoding!r}")
    factory = _DECODERS.get(encoding)
    if factory is None:
        raise Undecodable(f"unknown content coding {encoding!r}")
    try:
        return factory()
    except ImportError:
        raise Undecodable(f"no decoder installed for {encoding!r}") from None
