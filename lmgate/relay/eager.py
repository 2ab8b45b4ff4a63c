"""
Eager writes on the clients' plain TCP connections.

Twisted's TCP transport never writes in C{write()}: it queues the bytes, asks
epoll to watch the socket for writability (an C{epoll_ctl} system call), sends
on the reactor's next turn and then stops watching (another C{epoll_ctl}). A
relay writes once per streamed event on each side, so that round costs a
fifth of its time per event and delays every event by a reactor turn.

An eager transport sends at once when nothing is queued before it, and falls
back to Twisted's queue for whatever the kernel does not take (the socket
buffer is full), so ordering, flow control (a streaming producer is paused as
the queue grows) and error handling stay Twisted's. It stays out of the way
where sending at once would change behaviour: over TLS, while a pull producer
is registered (it is driven by the queue draining), once the connection is
closing, and while writes are queued.

C{holdWrites()} / C{releaseWrites()} gather the writes of one step (a
response's head and first body bytes) into one send.

Only the connections from clients are made eager: that is where each relayed
event is written. So is the usage limits' connection to Redis (its commands
are awaited by the calls they admit: a turn's delay would be every call's). Measured under C{wrk -c50} (bench/RESULTS.md), eager writes on
the client side alone, or on the upstream side alone, cost nothing, while both
at once lowered the requests per second by a fifth; the upstream side stays
Twisted's, where a request's head and body are gathered by the reactor turn.
"""

from __future__ import annotations

from typing import Any, Iterable

from twisted.internet import tcp

from lmgate.relay.twistedprivate import adoptSubclass, canSendAtOnce, hasWriteState


class _EagerWrites:
    """Mixed in before a C{tcp.Connection} subclass; see the module docstring."""

    _held: list[bytes] | None = None

    #: Whether this write can go out now (the transport's queue is empty...): a
    #: plain function of the transport, so each write asks without a call in between.
    _sendNow = canSendAtOnce

    def write(self, data: bytes) -> None:
        if self._held is not None:
            if not isinstance(data, bytes):
                raise TypeError(f"Data must be bytes, got {data!r}")
            self._held.append(data)
            return
        if data and self._sendNow():
            sent = self.writeSomeData(data)  # type: ignore[attr-defined]
            if isinstance(sent, int) and sent >= 0:
                if sent == len(data):
                    return
                data = data[sent:]
            # else: the socket failed; Twisted's queue meets the same error and closes properly
        super().write(data)  # type: ignore[misc]

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        if self._held is not None:
            for data in iovec:
                self.write(data)
            return
        if self._sendNow():
            self.write(b"".join(iovec))
            return
        super().writeSequence(iovec)  # type: ignore[misc]

    def holdWrites(self) -> None:
        """Gather writes until L{releaseWrites}."""
        if self._held is None:
            self._held = []

    def releaseWrites(self) -> None:
        """Write what was gathered, as one piece."""
        held, self._held = self._held, None
        if held:
            self.write(b"".join(held))


class EagerServer(_EagerWrites, tcp.Server):
    """An accepted TCP connection that writes eagerly."""


class EagerClient(_EagerWrites, tcp.Client):
    """A TCP connection LMGate made (to Redis) that writes eagerly."""


_EAGER: dict[type, type] = {tcp.Server: EagerServer, tcp.Client: EagerClient}


def makeEager(transport: Any) -> bool:
    """
    Turn a plain TCP transport into its eager kind (its class changes; its state
    is untouched). Anything else (TLS, UNIX sockets, test transports, a Twisted
    whose transport lacks the state read here) is left as it is.

    @return: whether the transport now writes eagerly.
    """
    eager = _EAGER.get(type(transport))
    if eager is not None and hasWriteState(transport):
        adoptSubclass(transport, eager)
        return True
    return isinstance(transport, _EagerWrites)


def noDelay(transport: Any) -> bool:
    """
    Turn Nagle off on C{transport}'s TCP connection, found through up to three
    wrappers (TLS) that do not offer it themselves: a small write then leaves
    at once even while an earlier one waits to be acknowledged (pipelined
    commands, a request's head then its body). Anything without TCP under it
    is left as it is.

    @return: whether Nagle is now off.
    """
    for _ in range(4):
        if transport is None:
            return False
        if hasattr(transport, "setTcpNoDelay"):
            try:
                transport.setTcpNoDelay(True)
            except Exception:  # a socket already closed: nothing to do
                return False
            return True
        transport = getattr(transport, "transport", None)
    return False


class heldWrites:
    """C{with heldWrites(transport): ...}: the writes inside go out as one piece (eager transports only)."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport if isinstance(transport, _EagerWrites) and transport._held is None else None

    def __enter__(self) -> None:
        if self._transport is not None:
            self._transport.holdWrites()

    def __exit__(self, *exc: object) -> None:
        if self._transport is not None:
            self._transport.releaseWrites()
