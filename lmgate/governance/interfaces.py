"""
The interface every managed credential implements (a key from the environment
or a file, Bedrock SigV4, Vertex OAuth), and the request it applies to.
"""

from typing import Union
from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers
from zope.interface import Attribute, Interface


class OutgoingRequest:
    """What LMGate is about to send upstream for one attempt: steps and credentials may change it.

    @ivar method: the request method.
    @ivar url: the full upstream URL (scheme, host, port, raw path as the client encoded it, raw query).
    @ivar headers: the headers to send (client credentials already removed for managed routes; Host not included).
    @ivar body: the request body when in memory, else None.
    @ivar bodyFile: an open binary file holding the body (spooled bodies) when C{body} is None, else None.
    @ivar bodySize: the body's size in bytes.
    """

    __slots__ = ("method", "url", "headers", "body", "bodyFile", "bodySize")

    def __init__(self, method: bytes, url: bytes, headers: Headers, body: bytes | None, bodyFile: object | None, bodySize: int) -> None:
        self.method, self.url, self.headers = method, url, headers
        self.body, self.bodyFile, self.bodySize = body, bodyFile, bodySize


class IUpstreamCredential(Interface):
    """The provider credential LMGate adds to a managed route's requests."""

    kind = Attribute("What the record's C{auth} says when this credential was used: 'managed'.")

    def apply(request: OutgoingRequest) -> "Deferred[None] | None":
        """
        Add the credential to C{request} (headers, or a signature over the exact bytes sent).
        Synchronous when possible (a header from memory); a Deferred when it must wait (a token
        refresh that has not finished yet). Never blocks the reactor: slow work (credential
        refresh, hashing a spooled body) runs in a thread pool given to the constructor.
        Raises / fails with L{CredentialUnavailable} when no credential can be had.
        """

    def startRefreshing() -> None:
        """Begin keeping the credential fresh (refresh ahead of expiry); no-op for static keys."""

    def stopRefreshing() -> None:
        """Stop background refreshes (service stop)."""


class CredentialUnavailable(Exception):
    """No credential could be had for a managed route (the call is answered 502/503 in the provider's shape, never relayed unsigned)."""
