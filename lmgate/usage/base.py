"""
What every usage reader shares: the sanity check on a count, the C{"invalid"}
verdict, and the reader base that decodes the wire bytes and never raises.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import wraps
from typing import Any, Callable

from zope.interface import implementer

from lmgate.interfaces import IUsageReader
from lmgate.records.record import Usage
from lmgate.usage.decoding import Decoder, Truncated

Json = dict[str, Any]

#: The first value of one response header, by lowercase name, or None when the
#: response has no such header. Readers take this, not a twisted.web object:
#: reading usage is bytes in, counts out.
HeaderLookup = Callable[[bytes], bytes | None]


#: Counts at or past this are not believed (nor can every reader of the record
#: hold them: JSON numbers are doubles to many, and a price times a huge integer
#: overflows a float).
COUNT_LIMIT = 2**53


class InvalidCount(ValueError):
    """A count that is present but not a sane integer: the usage cannot be trusted."""


def count(value: Any) -> int | None:
    """
    A token count: None when unreported (absent or null), else an integer
    0 <= n < L{COUNT_LIMIT}.

    @raise InvalidCount: anything else (a string, a float, NaN, a boolean, a
        negative or huge number).
    """
    if value is None:
        return None
    if type(value) is int and 0 <= value < COUNT_LIMIT:
        return value
    raise InvalidCount(repr(value)[:40])


def invalidate(usage: Usage) -> None:
    """No count of this usage is believed: all unknown, and the record says why."""
    usage.input_tokens = usage.output_tokens = usage.cached_tokens = None
    usage.cache_write_tokens = usage.reasoning_tokens = None
    usage.unreadable = "invalid"


def guarded(apply: Callable[[Usage, Any], None]) -> Callable[[Usage, Any], None]:
    """An apply function that leaves an unreadable usage alone and invalidates it on a bad count."""

    @wraps(apply)
    def guarded(usage: Usage, raw: Any) -> None:
        if usage.unreadable is not None:
            return
        try:
            apply(usage, raw)
        except InvalidCount:
            invalidate(usage)

    return guarded


def sumOf(*values: int | None) -> int | None:
    """The sum of the counts reported, None when none is."""
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def asDict(value: Any) -> Json:
    """C{value} if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def asStr(value: Any) -> str | None:
    """C{value} if it is a non-empty string, else None."""
    return value if isinstance(value, str) and value else None


def errorType(raw: Any) -> str:
    """The kind of error a provider's error object names (C{type}, C{code} or C{status}), else C{"error"}."""
    error = raw.get("error") if isinstance(raw, dict) else None
    if isinstance(error, dict):
        for key in ("type", "code", "status"):
            value = error.get(key)
            if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value):
                return str(value)
    return "error"


@implementer(IUsageReader)
class NullReader:
    """For bodies that carry no usage (error statuses, unknown formats)."""

    def __init__(self, streaming: bool = False) -> None:
        self._streaming = streaming

    def feed(self, data: bytes) -> None:
        pass

    def finish(self) -> Usage:
        return Usage(streaming=self._streaming)


@implementer(IUsageReader)
class DecodingReader(ABC):
    """Decodes the wire bytes and hands the pieces to C{_take}; any failure makes the usage unknown."""

    streaming = False

    def __init__(self, decoder: Decoder) -> None:
        self._decoder = decoder
        self._broken = False
        self._truncated = False  # reading stopped at a bound: the record says so

    def feed(self, data: bytes) -> None:
        if self._broken:
            return
        try:
            for piece in self._decoder.decode(data):
                if piece:
                    self._take(piece)
                if self._broken:
                    return
        except Truncated:
            self._truncate()
        except Exception:  # Undecodable, or a reader's own mistake: never the client's problem
            self._broken = True

    def _truncate(self) -> None:
        """Stop reading at a bound: nothing more is decoded or kept, and the usage is C{"truncated"}."""
        self._broken = self._truncated = True

    @abstractmethod
    def _take(self, piece: bytes) -> None:
        """Read the next decoded piece."""

    @abstractmethod
    def _result(self) -> Usage:
        """The usage read, once the body has ended."""

    def finish(self) -> Usage:
        if self._broken:
            return Usage(streaming=self.streaming, unreadable="truncated" if self._truncated else None)
        try:
            return self._result()
        except Exception:
            return Usage(streaming=self.streaming)
