"""
The daemon's lifecycle services: the tree that stops its parts one after
another, the drain of calls in flight, the garbage-collector freeze after
start-up, and the exit status that tells a supervisor records were lost.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.logger import Logger

log = Logger()


class OrderedMultiService(MultiService):
    """
    Stops its children one after another, last added first, each after the
    previous one's stop has finished: the listener closes, then calls in flight
    drain, and only then are the records flushed.
    """

    def __init__(self) -> None:
        MultiService.__init__(self)
        #: After stopping: how many usage records were lost (with workers: how many
        #: workers did not stop cleanly). Non-zero makes the process exit non-zero.
        self.lost: Callable[[], int] = lambda: 0

    @inlineCallbacks
    def stopService(self) -> Any:
        Service.stopService(self)
        for service in reversed(list(self)):
            try:
                yield maybeDeferred(service.stopService)
            except Exception:
                log.failure("Stopping {service} failed", service=service)


class FreezeService(Service):
    """
    Started last: moves every object alive after start-up (modules, the
    configuration, the allow-list) out of the garbage collector's reach
    (C{gc.freeze}). A full collection then walks only what calls create, so
    it pauses the reactor for a few milliseconds instead of tens, which
    would otherwise show up in every relayed event's delay.
    """

    def startService(self) -> None:
        import gc

        super().startService()
        gc.collect()
        gc.freeze()


class DrainService(Service):
    """
    Stops after the listener: keep-alive connections take no new request,
    calls in flight finish (bounded), then the rest are aborted and every
    client connection left is cut.
    """

    def __init__(self, drain: Callable[[float], Deferred[None]], timeout: float) -> None:
        self._drain, self.timeout = drain, timeout

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._drain(self.timeout)


#: The exit status of a daemon that stopped with usage records it could not write.
EXIT_RECORDS_LOST = 1


def exitNonZeroOnLoss(service: IService) -> None:
    """
    Make the process exit with L{EXIT_RECORDS_LOST} when records were lost at
    stop (the service's C{lost()}): twistd itself exits 0 whenever its reactor
    stopped, so a supervisor (systemd, a worker's supervisor) would not learn of
    it. Runs at interpreter exit, after twistd has removed its pid file.
    """
    import atexit
    import sys

    def atExit() -> None:
        lost = getattr(service, "lost", None)
        if lost is not None and lost():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_RECORDS_LOST)

    atexit.register(atExit)


class ThreadPoolService(Service):
    """
    A small thread pool with the daemon's lifetime: managed credentials refresh
    in it (reading files, asking a token endpoint, STS or the instance metadata
    service are blocking I/O) and hash spooled bodies for signing, never on the
    reactor thread. Started before the credentials begin refreshing, stopped
    after they stop (a refresh still running is waited for).

    @ivar pool: the pool, usable (work is queued) before it starts.
    """

    def __init__(self, name: str, maxThreads: int = 4) -> None:
        from twisted.python.threadpool import ThreadPool

        self.pool = ThreadPool(minthreads=0, maxthreads=maxThreads, name=name)

    def startService(self) -> None:
        Service.startService(self)
        self.pool.start()

    def stopService(self) -> None:
        Service.stopService(self)
        self.pool.stop()
