"""
The usage limits' lifetime in the daemon: the store's (a shared store
connects at start and disconnects at stop) and the renewal of the
concurrency leases of the calls in flight.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from lmgate.limits.limiter import Limiter


class LimitsService(Service):
    """
    Starts the limiter's store (if it has a lifetime), renews the leases of
    the calls in flight every third of C{lease_seconds}, and stops the store
    last (after the calls drained: their settlements go out first).
    """

    def __init__(self, limiter: Limiter, clock: IReactorTime) -> None:
        self.limiter = limiter
        self._renewal = LoopingCall(limiter.renew)
        self._renewal.clock = clock

    def startService(self) -> None:
        Service.startService(self)
        store: Any = self.limiter.store
        if IService.providedBy(store):
            store.startService()
        self._renewal.start(self.limiter.leaseSeconds / 3.0, now=False)

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        if self._renewal.running:
            self._renewal.stop()
        store: Any = self.limiter.store
        if IService.providedBy(store) and store.running:
            return maybeDeferred(store.stopService)
        return None
