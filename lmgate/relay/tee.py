"""
The response body on its way through: to the client first, to the usage reader
second, with the upstream paused while the client cannot keep up.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.server import Request
from zope.interface import implementer


class UpstreamIdle(Exception):
    """The upstream sent nothing for the idle timeout in the middle of a body."""


@implementer(IPushProducer)
class Tee(Protocol):
    """
    Relays one response body chunk by chunk, and copies each chunk to an observer.

    The tee is the client request's producer, standing for the upstream
    transport: when the client's send buffer fills, twisted.web pauses it and it
    pauses the upstream, so a slow client holds the upstream back instead of
    growing memory. A client paused for longer than C{clientTimeout} is cut
    (twisted.web's own timer does not run while a response is written); while
    the client holds the upstream back, the upstream idle timer does not run.

    @ivar done: fires with L{None} when the body ended cleanly, or fails with
        why it did not (L{UpstreamIdle}, a connection failure, ...).
    @ivar bytesRelayed: body bytes as they crossed the wire.
    @ivar clientStalled: the client stopped reading for C{clientTimeout} and was cut.
    @ivar paused: the client's buffer is full, so the upstream is held.

    @param clientFilter: what the client gets of each chunk, when not all of
        it (L{lmgate.policy.streamusage.UsageChunkFilter}: C{feed(bytes) ->
        bytes}, C{flush() -> bytes} at the end); the observer still sees every
        byte, and C{bytesRelayed} counts what the client got.
    """

    def __init__(
        self,
        request: Request,
        observe: Callable[[bytes], None],
        clock: IReactorTime,
        idleTimeout: float,
        clientTimeout: float = 60.0,
        clientFilter: Any = None,
    ) -> None:
        self.done: Deferred[None] = Deferred()
        self.bytesRelayed = 0
        self.clientStalled = False
        self.paused = False  # the client's buffer is full and the upstream is held
        self._request, self._observe = request, observe
        self._clock, self._idleTimeout, self._clientTimeout = clock, idleTimeout, clientTimeout
        self._idle: IDelayedCall | None = None
        self._stall: IDelayedCall | None = None
        self._idleFired = False
        self._filter = clientFilter

    def connectionMade(self) -> None:
        self._request.registerProducer(self, True)
        self._idle = self._clock.callLater(self._idleTimeout, self._timedOut)

    def dataReceived(self, data: bytes) -> None:
        if self._filter is None:
            self._request.write(data)  # the client first, bookkeeping second
            self.bytesRelayed += len(data)
        else:
            toClient = self._filter.feed(data)
            if toClient:
                self._request.write(toClient)
                self.bytesRelayed += len(toClient)
        if self._idle is not None:
            self._idle.reset(self._idleTimeout)
        self._observe(data)  # readers never raise

    # -- IPushProducer, for the client's side ----------------------------------

    def pauseProducing(self) -> None:
        """The client's buffer is full: hold the upstream, and start the client's clock."""
        self.paused = True
        transport: Any = self.transport
        transport.pauseProducing()
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._stall is None:
            self._stall = self._clock.callLater(self._clientTimeout, self._clientTooSlow)

    def resumeProducing(self) -> None:
        self.paused = False
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if self._idle is None and not self._idleFired and self.transport is not None:
            self._idle = self._clock.callLater(self._idleTimeout, self._timedOut)
        transport: Any = self.transport
        transport.resumeProducing()

    def stopProducing(self) -> None:
        """The client has gone: drop the upstream connection."""
        self.stop()

    def stop(self) -> None:
        """Drop the upstream connection."""
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()

    def _clientTooSlow(self) -> None:
        self._stall = None
        self.clientStalled = True
        channel: Any = self._request.channel
        if channel is not None and channel.transport is not None:
            channel.transport.abortConnection()
        self.stop()

    def _timedOut(self) -> None:
        self._idle = None
        self._idleFired = True
        self.stop()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for timer in (self._idle, self._stall):
            if timer is not None and timer.active():
                timer.cancel()
        self._idle = self._stall = None
        if self._request.channel is not None:  # None once the client has gone
            if self._filter is not None:
                held = self._filter.flush()  # an unfinished event the filter still held
                if held:
                    self._request.write(held)
                    self.bytesRelayed += len(held)
            self._request.unregisterProducer()
        if self._idleFired:
            self.done.errback(Failure(UpstreamIdle()))
        elif isinstance(reason.value, (ResponseDone, PotentialDataLoss)):  # Failure.check walks the MRO by name
            self.done.callback(None)
        else:
            self.done.errback(reason)  # not callback(reason): a Failure there goes down the errbacks
