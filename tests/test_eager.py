"""
Eager writes (lmgate.relay.eager) on real loopback TCP connections: sent at once when
nothing is queued, Twisted's queue for the rest, and out of the way where
sending at once would change behaviour.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from lmgate.relay.eager import EagerServer, heldWrites, makeEager
from tests.daemon import pause


class _Accepted(Protocol):
    def connectionMade(self) -> None:
        self.factory.accepted.callback(self)  # type: ignore[attr-defined]


@implementer(IPushProducer)
class _Producer:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


class EagerWriteTests(TestCase):
    async def accepted(self) -> tuple[Any, socket.socket]:
        """An accepted connection's transport, as Twisted made it, and the client's blocking socket."""
        factory = Factory.forProtocol(_Accepted)
        factory.accepted = Deferred()  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        protocol = await factory.accepted  # type: ignore[attr-defined]
        self.addCleanup(protocol.transport.abortConnection)
        return protocol.transport, client

    async def connection(self) -> tuple[Any, socket.socket]:
        """The same, made eager."""
        transport, client = await self.accepted()
        self.assertTrue(makeEager(transport))
        self.assertIsInstance(transport, EagerServer)
        return transport, client

    def available(self, client: socket.socket) -> bytes:
        """What the client can read right now, without the reactor running."""
        client.setblocking(False)
        try:
            return client.recv(1 << 20)
        except BlockingIOError:
            return b""
        finally:
            client.setblocking(True)

    async def test_sentAtOnce(self) -> None:
        """With nothing queued, write and writeSequence reach the peer before the reactor turns."""
        transport, client = await self.connection()
        transport.write(b"hello ")
        transport.writeSequence([b"wor", b"ld"])
        await pause(0.05)  # only so the bytes cross loopback; the point is what is queued
        self.assertEqual(transport._tempDataLen, 0)
        self.assertEqual(self.available(client), b"hello world")

    async def test_stockTransportQueues(self) -> None:
        """For contrast: Twisted's own transport queues the write for the next reactor turn."""
        transport, client = await self.connection()
        transport.__class__ = EagerServer.__mro__[2]  # tcp.Server
        transport.write(b"queued")
        self.assertEqual(transport._tempDataLen, 6)

    async def test_heldWritesGoAsOnePiece(self) -> None:
        """Writes held together are one send."""
        transport, client = await self.connection()
        sends: list[bytes] = []
        real = transport.writeSomeData

        def counting(data: Any) -> Any:
            sends.append(bytes(data))
            return real(data)

        transport.writeSomeData = counting
        with heldWrites(transport):
            transport.writeSequence([b"HTTP/1.1 200 OK\r\n", b"\r\n"])
            transport.write(b"body")
        self.assertEqual(sends, [b"HTTP/1.1 200 OK\r\n\r\nbody"])

    async def test_fullSocketQueuesTheRestInOrder(self) -> None:
        """What the kernel does not take is queued behind, a streaming producer is paused
        as the queue grows, and the peer gets every byte in order."""
        transport, client = await self.connection()
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        producer = _Producer()
        transport.registerProducer(producer, True)
        data = bytes(range(256)) * 4096  # 1 MiB: more than both socket buffers hold
        pieces = [data[i : i + 32768] for i in range(0, len(data), 32768)]
        for piece in pieces:
            transport.write(piece)
        self.assertGreater(transport._tempDataLen + len(transport.dataBuffer) - transport.offset, 0)
        self.assertGreaterEqual(producer.paused, 1)
        def readAll() -> bytes:  # in a thread, while the reactor drains the queue
            received = bytearray()
            client.settimeout(30)
            while len(received) < len(data):
                chunk = client.recv(65536)
                if not chunk:
                    break
                received += chunk
            return bytes(received)

        from twisted.internet.threads import deferToThread

        received = await deferToThread(readAll)
        self.assertEqual(bytes(received), data)
        self.assertGreaterEqual(producer.resumed, 1)

    async def test_notEagerWithPullProducerOrClosing(self) -> None:
        """A pull producer is driven by the queue draining, and a closing connection
        finishes Twisted's way: both keep the queue."""
        transport, client = await self.connection()

        class Pull:
            def resumeProducing(self) -> None:
                pass

            def stopProducing(self) -> None:
                pass

        transport.registerProducer(Pull(), False)
        transport.write(b"pulled")
        self.assertEqual(transport._tempDataLen, 6)
        transport.unregisterProducer()
        transport.loseConnection()
        transport.write(b"late")
        self.assertEqual(transport._tempDataLen, 10)

    async def test_unknownTwistedLeftAlone(self) -> None:
        """A transport without the state the eager path reads (another Twisted) keeps Twisted's writes."""
        import lmgate.relay.twistedprivate
        from twisted.internet import tcp

        transport, _ = await self.accepted()
        self.patch(
            lmgate.relay.twistedprivate,
            "WRITE_STATE",
            lmgate.relay.twistedprivate.WRITE_STATE + ("_renamedInANewerTwisted",),
        )
        self.assertFalse(makeEager(transport))
        self.assertIs(type(transport), tcp.Server)

    def test_otherTransportsLeftAlone(self) -> None:
        """Anything but a plain TCP connection (TLS, UNIX, test transports) is not changed."""
        transport = StringTransport()
        self.assertFalse(makeEager(transport))
        self.assertIs(type(transport), StringTransport)
        with heldWrites(transport):
            transport.write(b"x")
        self.assertEqual(transport.value(), b"x")
