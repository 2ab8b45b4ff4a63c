"""Workers sharing one listening socket: connections opened in a burst are spread."""

from __future__ import annotations

import os
import socket

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from lmgate.workers import AdoptedListener
from tests.daemon import pause


class _Counting(Factory):
    def __init__(self) -> None:
        self.count = 0

    def buildProtocol(self, addr: object) -> Protocol:
        self.count += 1
        return Protocol()


class AdoptedListenerTests(TestCase):
    async def test_burstIsShared(self) -> None:
        """Two listeners on one socket (as two workers): a burst of 20 connections is
        split between them, not taken whole by the first one woken."""
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen(128)
        listening.setblocking(False)
        self.addCleanup(listening.close)
        factories = [_Counting(), _Counting()]
        for factory in factories:
            listener = AdoptedListener(reactor, os.dup(listening.fileno()), factory)
            listener.startService()
            self.addCleanup(listener.stopService)
            self.assertEqual(listener._port.numberAccepts, 1)
        clients = [socket.create_connection(listening.getsockname()) for _ in range(20)]
        for client in clients:
            self.addCleanup(client.close)
        for _ in range(100):  # bounded: until every connection is accepted
            if sum(f.count for f in factories) == 20:
                break
            await pause(0.01)
        counts = sorted(f.count for f in factories)
        self.assertEqual(sum(counts), 20)
        self.assertGreaterEqual(counts[0], 5, counts)
        listener._port.numberAccepts = 120  # what Twisted's accept loop sets as traffic grows
        self.assertEqual(listener._port.numberAccepts, 1)
