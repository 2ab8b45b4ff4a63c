"""
Bounded decoding of compressed response bodies, for reading only.

The client always receives the original bytes; the usage readers see them
decoded, one layer (gzip, deflate, and brotli / zstd where their packages are
installed), in pieces of at most L{PIECE} bytes, so a decompression bomb cannot
make one call hold more than a piece.

Decoding costs the reactor time, and reading the decoded bytes costs more (a
stream reader looks at every line): a compressed body is therefore read only up
to a budget of decoded bytes per call, and a stream only up to L{CHUNK_BUDGET}
decoded bytes per wire chunk. Past either, L{Truncated} is raised: the reader
stops and says so, and the client still gets every byte.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterator

#: The most decoded bytes produced at once.
PIECE = 65536

#: The most decoded bytes one wire chunk of a stream may give: what one turn of
#: the reactor spends reading it stays small (a 64 KiB read inflating 16-fold).
CHUNK_BUDGET = 16 * PIECE

#: A compressed body's decoded bytes read per call: this many times
#: C{stats.capture_limit}.
BUDGET_FACTOR = 16


class Undecodable(Exception):
    """The body cannot be decoded (bad data, or no decoder for its encoding)."""


class Truncated(Undecodable):
    """Reading stopped at a bound (decoded bytes per call or per chunk, a frame's size)."""


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
    """
    zstd, fed in small slices so one slice's output stays small (the package's
    C{decompress} has no output limit; an RLE block of 4 bytes can stand for
    128 KiB, so a slice gives at most 2 MiB), and cut into L{PIECE}s.
    """

    SLICE = 64

    def __init__(self) -> None:
        import zstandard

        self._zstd = zstandard
        self._decompressor = zstandard.ZstdDecompressor().decompressobj()

    def decode(self, data: bytes) -> Iterator[bytes]:
        try:
            for start in range(0, len(data), self.SLICE):
                out = self._decompressor.decompress(data[start : start + self.SLICE])
                if len(out) <= PIECE:
                    yield out
                else:
                    for at in range(0, len(out), PIECE):
                        yield out[at : at + PIECE]
        except self._zstd.ZstdError as e:
            raise Undecodable(str(e)) from None


class Bounded(Decoder):
    """
    Another decoder's pieces, up to C{budget} decoded bytes in all and
    C{perChunk} (when given) for the pieces of one wire chunk.
    """

    def __init__(self, inner: Decoder, budget: int, perChunk: int | None) -> None:
        self._inner, self._room, self._perChunk = inner, budget, perChunk

    def decode(self, data: bytes) -> Iterator[bytes]:
        chunkRoom = self._perChunk
        for piece in self._inner.decode(data):
            self._room -= len(piece)
            if self._room < 0:
                raise Truncated("past the decoded bytes read per call")
            if chunkRoom is not None:
                chunkRoom -= len(piece)
                if chunkRoom < 0:
                    raise Truncated("past the decoded bytes read per wire chunk")
            yield piece


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


def decoderFor(contentEncoding: bytes | None, budget: int | None = None, perChunk: int | None = None) -> Decoder:
    """
    The decoder for a C{Content-Encoding} value.

    @param budget: with a compressed body, the most decoded bytes read in all
        (L{Truncated} past it); identity bodies are never bounded here, as
        their bytes are the wire's.
    @param perChunk: the most decoded bytes one wire chunk may give.
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
        decoder = factory()
    except ImportError:
        raise Undecodable(f"no decoder installed for {encoding!r}") from None
    if budget is None or factory is Identity:
        return decoder
    return Bounded(decoder, budget, perChunk)
