"""
The seams of the gateway: each has, or will have, several implementations.

A request goes through an L{IKeyCheck} (who is calling), is relayed, its response
bytes are fed to an L{IUsageReader} (what did it cost), and the finished call is
handed to an L{IUsageSink} (where the record goes).
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

from lmgate.records.record import KeyEntry, Usage, UsageRecord


class IKeyCheck(Interface):
    """
    Decides whether an API key may use the gateway.

    Implementations keep their lookups in memory: C{lookup} never touches a disk
    or the network, because it runs on the reactor thread for every call.
    """

    def lookup(key: bytes) -> KeyEntry | None:
        """
        Find the allow-list entry for a key.

        @param key: the credential exactly as the client sent it (for AWS SigV4,
            the access key id).
        @return: the matching L{lmgate.records.record.KeyEntry}, or L{None} when the key
            is not allowed.
        """

    size = Attribute("How many keys are currently allowed (an L{int}).")


class IUsageReader(Interface):
    """
    Reads token usage incrementally from the bytes of one response body.

    One reader serves one call. It sees the body exactly as it crossed the wire
    (compressed when compressed), in whatever chunks the network delivered, and
    keeps only what it needs (bounded by the capture limit).
    """

    def feed(data: bytes) -> None:
        """
        Take the next chunk of the response body. Never raises: a body that cannot
        be read makes the usage unknown, never an error for the client.
        """

    def finish() -> Usage:
        """
        The body has ended (completely or not). Return the L{lmgate.records.record.Usage}
        read from it. Called at most once. Never raises.
        """


class IUsageSink(Interface):
    """
    Takes finished usage records. Never blocks and never raises: a proxied call
    must not wait for, or fail because of, the record of it.
    """

    def write(record: UsageRecord) -> None:
        """
        Accept one L{lmgate.records.record.UsageRecord}.
        """
