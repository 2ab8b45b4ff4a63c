"""
The response body on its way through: to the client first, to the usage reader
second, with the upstream paused while the client cannot keep up.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.server import Request


class UpstreamIdle(Exception):
    """The upstream sent nothing for the idle timeout in the middle of a body."""


class Tee(Protocol):
    """
    Relays one response body chunk by chunk, and copies each chunk to an observer.

    The upstream transport becomes the client request's producer: when the
    client's send buffer fills, twisted.web pauses it, so a slow client holds
    the upstream back instead of growing memory; when the client leaves, it is
    stopped, which drops the upstream connection.

    @ivar done: fires with L{None} when the body ended cleanly, or fails with
        why it did not (L{UpstreamIdle}, a connection failure, ...).
    @ivar bytesRelayed: body bytes as they crossed the wire.
    """

    def __init__(
        self,
        request: Request,
        observe: Callable[[bytes], None],
        clock: IReactorTime,
        idleTimeout: float,
    ) -> None:
        self.done: Deferred[None] = Deferred()
        self.bytesRelayed = 0
        self._request, self._observe = request, observe
        self._clock, self._idleTimeout = clock, idleTimeout
        self._idle: IDelayedCall | None = None
        self._idleFired = False

    def connectionMade(self) -> None:
        self._request.registerProducer(self.transport, True)
        self._idle = self._clock.callLater(self._idleTimeout, self._timedOut)

    def dataReceived(self, data: bytes) -> None:
        self._request.write(data)  # the client first, bookkeeping second
        self.bytesRelayed += len(data)
        if self._idle is not None:
            self._idle.reset(self._idleTimeout)
        self._observe(data)  # readers never raise

    def stop(self) -> None:
        """Drop the upstream connection (the client has gone)."""
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()

    def _timedOut(self) -> None:
        self._idle = None
        self._idleFired = True
        self.stop()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._request.channel is not None:  # None once the client has gone
            self._request.unregisterProducer()
        if self._idleFired:
            self.done.errback(Failure(UpstreamIdle()))
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)  # not callback(reason): a Failure there goes down the errbacks
