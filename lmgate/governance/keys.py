"""
Provider API keys held by LMGate: read from an environment variable or from
the first line of a file, and added to a managed route's requests in the
provider's own header (L{StaticKeyCredential}).

The key is kept in memory as the header value it becomes, replaced in one
assignment when it is read again (SIGHUP), so a call sees the old key or the
new one. It never appears in a repr, a log line or an error message: those
name the variable or the file.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from typing import Mapping

from twisted.internet.defer import Deferred
from zope.interface import implementer

from lmgate.governance.interfaces import CredentialUnavailable, IUpstreamCredential, OutgoingRequest

#: A key is one run of visible ASCII characters: nothing that could end a header line.
_KEY = re.compile(rb"[\x21-\x7e]+")


class KeySource(ABC):
    """Where a key is read from: names it (for messages), reads it."""

    #: How messages name the source: C{OPENAI_API_KEY}, C{/etc/lmgate/secrets/openai}.
    what: str = ""

    @abstractmethod
    def read(self) -> bytes:
        """
        The key, stripped.

        @raise CredentialUnavailable: the variable is unset or empty, the file
            is absent, unreadable or empty, or the key has characters a header
            cannot carry (the message names the source, never the value).
        """


class EnvironmentKey(KeySource):
    """A key in an environment variable (read from C{environ}: C{os.environ} by default)."""

    def __init__(self, name: str, environ: Mapping[str, str] | None = None) -> None:
        self.what, self._name = f"the environment variable {name}", name
        self._environ = os.environ if environ is None else environ

    def read(self) -> bytes:
        value = self._environ.get(self._name, "").strip()
        if not value:
            raise CredentialUnavailable(f"{self._name} is not set")
        return _checked(value.encode("utf-8", "replace"), self.what)


class FileKey(KeySource):
    """A key on the first line of a file (a mounted secret)."""

    def __init__(self, path: str) -> None:
        self.what, self._path = f"the file {path}", path

    def read(self) -> bytes:
        try:
            with open(self._path, "rb") as f:
                first = f.readline(65536)
        except FileNotFoundError:
            raise CredentialUnavailable(f"{self._path} does not exist") from None
        except OSError as e:
            raise CredentialUnavailable(f"{self._path} cannot be read: {e.strerror or type(e).__name__}") from None
        value = first.strip()
        if not value:
            raise CredentialUnavailable(f"{self._path} is empty (the key is its first line)")
        return _checked(value, self.what)


def _checked(value: bytes, what: str) -> bytes:
    if _KEY.fullmatch(value) is None:
        raise CredentialUnavailable(f"the key in {what} has characters a header cannot carry")
    return value


@implementer(IUpstreamCredential)
class StaticKeyCredential:
    """
    A provider API key added as one header (C{Authorization: Bearer <key>},
    C{x-api-key: <key>} ...), replacing any the request still has.

    @param source: where the key is read.
    @param header: the header's name.
    @param scheme: the word before the key (C{Bearer}), or None.
    """

    kind = "managed"

    def __init__(self, source: KeySource, header: str, scheme: str | None) -> None:
        self._source = source
        self._header = header.encode("ascii")
        self._prefix = (scheme + " ").encode("ascii") if scheme else b""
        self._value: bytes | None = None

    def __repr__(self) -> str:
        state = "loaded" if self._value is not None else "not loaded"
        return f"<StaticKeyCredential {self._header.decode()} from {self._source.what} ({state}, redacted)>"

    @property
    def source(self) -> str:
        """Where the key is read from, for messages."""
        return self._source.what

    @property
    def loaded(self) -> bool:
        """Whether a key was ever read."""
        return self._value is not None

    def reload(self) -> None:
        """
        Read the key again and use it from the next call on (one assignment).

        @raise CredentialUnavailable: it cannot be read; the previous key, if
            any, stays in use.
        """
        self._value = self._prefix + self._source.read()

    def apply(self, request: OutgoingRequest) -> Deferred[None] | None:
        value = self._value
        if value is None:
            raise CredentialUnavailable(f"no key could be read from {self._source.what}")
        request.headers.setRawHeaders(self._header, [value])
        return None

    def startRefreshing(self) -> None:
        """Nothing to refresh: the key is read again on SIGHUP (L{reload})."""

    def stopRefreshing(self) -> None:
        """Nothing to stop."""
