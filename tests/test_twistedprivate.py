"""
Tripwires for the private Twisted names LMGate relies on (L{lmgate.relay.twistedprivate}).

One test per reliance: each fails with a message naming what changed in Twisted
when an upgrade removes or changes it. Run these first after changing the
Twisted pin (docs/operations.md, "Upgrading Twisted"):

    python -m twisted.trial tests.test_twistedprivate
"""

from __future__ import annotations

import ast
import os
import signal
import socket
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import tcp
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import _newclient
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from zope.interface import implementer

from lmgate.relay import twistedprivate
from lmgate.relay.twistedprivate import (
    RESPONSE_HEADER,
    RESPONSE_STATUS,
    InspectableHTTPChannel,
    PlatformTrustAndBundle,
    RelayClientProtocol,
    RelayConnectionPool,
    RelayResponseParser,
    acceptOneAtATime,
    accessLogEscape,
    adoptSubclass,
    canSendAtOnce,
    clientRequest,
    decodeChunkedPrefix,
    hasWriteState,
    raiseListenErrorsAtStart,
    serverEndpointAddress,
    twistdLogFile,
)

ROOT = Path(__file__).resolve().parent.parent
DOOR = "lmgate/relay/twistedprivate.py"


def changed(what: str) -> str:
    """The message of a tripped wire."""
    return f"Twisted {what} changed: see docs/operations.md 'Upgrading Twisted' and lmgate/relay/twistedprivate.py"


@implementer(IStreamClientEndpoint)
class _StringEndpoint:
    """Connects each factory's protocol to a fresh StringTransport at once."""

    def __init__(self, transport: type[StringTransport] = StringTransport) -> None:
        self.factories: list[Any] = []
        self.protocols: list[Any] = []
        self._transport = transport

    def connect(self, factory: Any) -> Deferred[Any]:
        self.factories.append(factory)
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(self._transport())
        self.protocols.append(protocol)
        return succeed(protocol)


class _EndpointFactory:
    def __init__(self, endpoint: _StringEndpoint) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: Any) -> _StringEndpoint:
        return self._endpoint


def _request() -> Any:
    return clientRequest(b"GET", b"/v1/x", Headers({b"host": [b"h"]}), None, persistent=True, parsedURI=None)


class ClientTripwires(SynchronousTestCase):
    """The relay's upstream side: twisted.web._newclient and the connection pool."""

    def test_parserStates(self) -> None:
        """The response parser's C{state} is STATUS, then HEADER, while it reads the head; then neither."""
        parser = RelayResponseParser(_request(), lambda rest: None)
        parser.makeConnection(_newclient.TransportProxyProducer(StringTransport()))
        self.assertEqual(parser.state, RESPONSE_STATUS, changed("_newclient.HTTPClientParser's STATUS state"))
        parser.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertEqual(parser.state, RESPONSE_HEADER, changed("_newclient.HTTPClientParser's HEADER state"))
        parser.dataReceived(b"Content-Length: 2\r\n\r\n")
        self.assertNotIn(parser.state, (RESPONSE_STATUS, RESPONSE_HEADER), changed("_newclient.HTTPClientParser's states"))

    def test_protocolKeepsItsFreshParser(self) -> None:
        """
        C{HTTP11ClientProtocol.request} builds a plain C{HTTPClientParser},
        keeps it in C{_parser} and connects it before it returns; the relay's
        protocol gives that one parser its C{parserClass}.
        """
        stock = _newclient.HTTP11ClientProtocol()
        stock.makeConnection(StringTransport())
        stock.request(_request())
        parser = getattr(stock, "_parser", None)
        self.assertIs(type(parser), _newclient.HTTPClientParser, changed("HTTP11ClientProtocol.request's parser (_parser)"))
        self.assertEqual(parser.state, RESPONSE_STATUS, changed("HTTP11ClientProtocol.request connecting its parser"))

        class Marked(RelayResponseParser):
            pass

        class Relay(RelayClientProtocol):
            parserClass = Marked

        relay = Relay()
        relay.makeConnection(StringTransport())
        relay.request(_request())
        self.assertIs(type(relay._parser), Marked)
        relay.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(relay._parser, None)  # the response is done: Twisted let go of it

    def test_adoptedParsersAddNoState(self) -> None:
        """
        The parser classes given to a built parser keep no state of their own in
        C{__init__} or C{connectionMade} (Twisted's ran before the class changed).
        """
        from lmgate.relay.upstream import BoundedHTTPClientParser

        for cls in BoundedHTTPClientParser.__mro__[: BoundedHTTPClientParser.__mro__.index(_newclient.HTTPClientParser)]:
            self.assertNotIn("__init__", vars(cls), cls)
            self.assertNotIn("connectionMade", vars(cls), cls)

    def test_plainAgentKeepsTwistedsParser(self) -> None:
        """
        No process-wide change: in the same process, after the relay's pool has
        sent a request, a plain Agent's connection still reads its response with
        Twisted's own parser; and not even while the relay sends its request is
        C{twisted.web._newclient}'s C{HTTPClientParser} anything but Twisted's.
        """
        from lmgate.relay.upstream import BoundedHTTPClientParser, RelayPool

        stock = _newclient.HTTPClientParser
        seenWhileSending: list[type] = []

        class Watching(StringTransport):
            def write(self, data: bytes) -> None:
                seenWhileSending.append(_newclient.HTTPClientParser)
                super().write(data)

            def writeSequence(self, data: Any) -> None:
                seenWhileSending.append(_newclient.HTTPClientParser)
                super().writeSequence(data)

        reactor = MemoryReactorClock()
        relayEndpoint = _StringEndpoint(Watching)
        relayPool = RelayPool(reactor, persistent=True)
        connections: list[Any] = []
        relayPool.getConnection(("http", b"h", 80), relayEndpoint).addCallback(connections.append)
        connections[0].request(_request())
        self.assertIs(type(relayEndpoint.protocols[0]._parser), BoundedHTTPClientParser)
        self.assertEqual(set(seenWhileSending), {stock})

        plainEndpoint = _StringEndpoint()
        agent = Agent.usingEndpointFactory(reactor, _EndpointFactory(plainEndpoint), HTTPConnectionPool(reactor))
        agent.request(b"GET", b"http://h/x")
        self.assertIs(type(plainEndpoint.protocols[0]._parser), _newclient.HTTPClientParser)
        self.assertIs(type(plainEndpoint.protocols[0]), _newclient.HTTP11ClientProtocol)
        self.assertIs(_newclient.HTTPClientParser, _newclient.HTTP11ClientProtocol.request.__globals__["HTTPClientParser"])

    def test_poolBuildsFactoryFromFactoryAttribute(self) -> None:
        """
        C{HTTPConnectionPool} builds each new connection's factory with
        C{self._factory(quiescentCallback, metadata)}, and C{_HTTP11ClientFactory}
        keeps the callback in C{_quiescentCallback}: a connection done with its
        response goes back to the pool.
        """
        reactor = MemoryReactorClock()
        endpoint = _StringEndpoint()
        pool = RelayConnectionPool(reactor, persistent=True)
        connections: list[Any] = []
        pool.getConnection(("http", b"h", 80), endpoint).addCallback(connections.append)
        self.assertEqual(len(connections), 1, changed("HTTPConnectionPool._newConnection (self._factory)"))
        self.assertIs(type(connections[0]), RelayClientProtocol, changed("HTTPConnectionPool._factory"))
        self.assertFalse(endpoint.factories[0].noisy)
        connections[0].request(_request())
        connections[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        again: list[Any] = []
        pool.getConnection(("http", b"h", 80), endpoint).addCallback(again.append)
        self.assertEqual(len(again), 1)
        self.assertEqual(len(endpoint.protocols), 1, changed("_HTTP11ClientFactory._quiescentCallback"))  # reused

    def test_transportProxyProducerHoldsConnection(self) -> None:
        """
        C{TransportProxyProducer} keeps the connection in C{_producer}, and
        Twisted's parser pauses it when the head is complete, before it fires the
        response Deferred; the relay's parser holds that pause when the body is
        taken at once.
        """
        transport = StringTransport()
        proxy = _newclient.TransportProxyProducer(transport)
        self.assertIs(getattr(proxy, "_producer", None), transport, changed("TransportProxyProducer._producer"))

        def states(parserClass: type) -> list[str]:
            transport = StringTransport()
            parser = parserClass(_request(), lambda rest: None)
            parser.makeConnection(_newclient.TransportProxyProducer(transport))
            seen: list[str] = []
            parser._responseDeferred.addCallback(lambda response: seen.append(transport.producerState))
            parser.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
            return seen + [transport.producerState]

        self.assertEqual(states(_newclient.HTTPClientParser), ["paused", "paused"], changed("HTTPClientParser.allHeadersReceived's pause"))
        self.assertEqual(states(RelayResponseParser), ["producing", "paused"])

    def test_requestConstruct(self) -> None:
        """C{Request._construct} takes the parsed URI, which C{absoluteURI} reads."""
        from twisted.web.client import URI

        uri = URI.fromBytes(b"https://h:8443/v1/x?a=1")
        request = clientRequest(b"POST", b"/v1/x?a=1", Headers(), None, persistent=True, parsedURI=uri)
        self.assertIsInstance(request, _newclient.Request)
        self.assertEqual(
            (request.method, request.uri, request.persistent, request.absoluteURI),
            (b"POST", b"/v1/x?a=1", True, b"https://h:8443/v1/x?a=1"),
            changed("_newclient.Request._construct"),
        )

    def test_trustRootInterface(self) -> None:
        """
        C{optionsForClientTLS} accepts a provider of the private
        C{IOpenSSLTrustRoot} and, when it makes its OpenSSL context (as
        C{optionsForClientTLS} does for each connection), calls its
        C{_addCACertsToContext} with it.
        """
        from twisted.internet._sslverify import IOpenSSLTrustRoot
        from twisted.internet.ssl import CertificateOptions, optionsForClientTLS

        contexts: list[Any] = []

        class Recording(PlatformTrustAndBundle):
            def _addCACertsToContext(self, context: Any) -> None:
                contexts.append(context)

        trust = Recording("/nonexistent")
        self.assertTrue(IOpenSSLTrustRoot.providedBy(trust), changed("_sslverify.IOpenSSLTrustRoot"))
        optionsForClientTLS("example.test", trustRoot=trust)  # accepted
        CertificateOptions(trustRoot=trust).getContext()
        self.assertEqual(len(contexts), 1, changed("IOpenSSLTrustRoot._addCACertsToContext"))
        self.assertTrue(hasattr(contexts[0], "load_verify_locations"))


class _Watching(InspectableHTTPChannel):
    """Notes what the public names show when the headers are complete, and bad requests."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []
        self.bad = 0

    def allHeadersReceived(self) -> None:
        self.seen.append((self.requestLine(), self.bufferedBytes(), self.handlingRequest, getattr(self, "_transferDecoder", None)))
        super().allHeadersReceived()

    def badRequestReceived(self) -> None:
        self.bad += 1
        super().badRequestReceived()


def _channel(clock: Clock | None = None) -> tuple[_Watching, StringTransport]:
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    channel = _Watching()
    channel.site = Site(Resource())
    if clock is not None:
        channel.callLater = clock.callLater  # type: ignore[method-assign]
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


class ChannelTripwires(SynchronousTestCase):
    """The clients' side: twisted.web.http.HTTPChannel's private state."""

    def test_requestLineAndBuffer(self) -> None:
        """
        When the headers are complete, C{_command}, C{_path}, C{_version} hold the
        request line and LineReceiver's C{_buffer} the body bytes that came with them.
        """
        channel, _ = _channel()
        channel.dataReceived(b"POST /openai/v1/x?k=1 HTTP/1.1\r\nHost: g\r\nContent-Length: 10\r\n\r\nabc")
        line, buffered, handling, _ = channel.seen[0]
        self.assertEqual(line, (b"POST", b"/openai/v1/x?k=1", b"HTTP/1.1"), changed("HTTPChannel._command/_path/_version"))
        self.assertEqual(buffered, b"abc", changed("LineReceiver._buffer"))
        self.assertFalse(handling, changed("HTTPChannel._handlingRequest"))
        self.assertIsNone(InspectableHTTPChannel().requestLine())

    def test_handlingRequest(self) -> None:
        """C{_handlingRequest} is true from a request's last byte until its response is done."""
        channel, _ = _channel()
        self.assertFalse(channel.handlingRequest)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: g\r\n\r\n")
        self.assertTrue(channel.handlingRequest, changed("HTTPChannel._handlingRequest"))

    def test_chunkedDecoder(self) -> None:
        """
        A chunked request's body decoder is C{_transferDecoder}, a
        C{_ChunkedTransferDecoder(dataCallback, finishCallback)}.
        """
        from twisted.web.http import _ChunkedTransferDecoder

        channel, _ = _channel()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        self.assertIsInstance(channel.seen[0][3], _ChunkedTransferDecoder, changed("HTTPChannel._transferDecoder"))
        channel.stopBodyDecoding()
        self.assertIsNone(getattr(channel, "_transferDecoder", "missing"), changed("HTTPChannel._transferDecoder"))
        self.assertEqual(decodeChunkedPrefix(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), b"abcde", changed("_ChunkedTransferDecoder"))
        self.assertEqual(decodeChunkedPrefix(b"3\r\nabc\r\nzz\r\nde"), b"abc", changed("_ChunkedTransferDecoder"))

    def test_badRequestHook(self) -> None:
        """HTTPChannel answers a malformed request line through C{_respondToBadRequestAndDisconnect}."""
        channel, transport = _channel()
        channel.dataReceived(b"NOT A REQUEST LINE AT ALL\r\n")
        self.assertEqual(channel.bad, 1, changed("HTTPChannel._respondToBadRequestAndDisconnect"))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 Bad Request"))
        channel, transport = _channel()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: g\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        self.assertEqual(channel.bad, 1, changed("HTTPChannel._respondToBadRequestAndDisconnect (conflicting lengths)"))

    def test_abortingCall(self) -> None:
        """C{connectionLost} cancels the cut scheduled in C{_abortingCall}."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        clock = Clock()
        channel, _ = _channel(clock)
        channel.setTimeout(None)
        channel.scheduleAbort(5)
        self.assertTrue(channel.abortScheduled())
        self.assertIs(channel._abortingCall, clock.getDelayedCalls()[0], changed("HTTPChannel._abortingCall"))
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(clock.getDelayedCalls(), [], changed("HTTPChannel.connectionLost cancelling _abortingCall"))
        self.assertFalse(channel.abortScheduled())

    def test_accessLogEscape(self) -> None:
        """The combined log format escapes with C{twisted.web.http._escape}: a repr, requoted."""
        from twisted.web import http

        self.assertIs(http.combinedLogFormatter.__globals__.get("_escape"), accessLogEscape, changed("twisted.web.http._escape"))
        self.assertEqual(accessLogEscape(b'a"b\\c\x01\xff\'d'), 'a\\"b\\\\c\\x01\\xff\'d', changed("twisted.web.http._escape"))
        self.assertEqual(accessLogEscape("plain/path?q=1"), "plain/path?q=1")


class _Accepted(Protocol):
    def connectionMade(self) -> None:
        self.factory.accepted.callback(self)  # type: ignore[attr-defined]


class TransportTripwires(TestCase):
    """TCP transports and ports: twisted.internet.tcp's write queue and accept loop."""

    async def accepted(self) -> Any:
        from twisted.internet import reactor

        factory = Factory.forProtocol(_Accepted)
        factory.accepted = Deferred()  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        protocol = await factory.accepted  # type: ignore[attr-defined]
        self.addCleanup(protocol.transport.abortConnection)
        return protocol.transport

    async def test_writeQueueState(self) -> None:
        """
        A tcp.Server queues a write in C{_tempDataLen} (not sent in C{write}),
        and notes C{loseWriteConnection} in C{_writeDisconnected}.
        """
        transport = await self.accepted()
        self.assertIs(type(transport), tcp.Server)
        self.assertTrue(hasWriteState(transport), changed("tcp.Connection's write state (" + ", ".join(twistedprivate.WRITE_STATE) + ")"))
        self.assertTrue(canSendAtOnce(transport))
        transport.write(b"queued")
        self.assertEqual(transport._tempDataLen, 6, changed("FileDescriptor._tempDataLen"))
        self.assertFalse(canSendAtOnce(transport))
        transport2 = await self.accepted()
        transport2.loseWriteConnection()
        transport2.doWrite()  # the reactor's next turn: nothing queued, the write side closes
        self.assertTrue(transport2._writeDisconnected, changed("FileDescriptor._writeDisconnected"))
        self.assertFalse(canSendAtOnce(transport2))

    async def test_adoptSubclass(self) -> None:
        """A live tcp.Server takes a subclass (no __slots__, no state set in __init__ needed)."""
        from lmgate.relay.eager import EagerServer, makeEager

        transport = await self.accepted()
        self.assertTrue(makeEager(transport), changed("tcp.Server (class adoption)"))
        self.assertIs(type(transport), EagerServer)
        transport.write(b"x")
        self.assertRaises(TypeError, adoptSubclass, StringTransport(), EagerServer)

    def test_oneAcceptPerWakeUp(self) -> None:
        """C{tcp.Port.doRead} accepts up to C{numberAccepts} per call (and assigns it); adopted, one."""
        self.assertIn("numberAccepts", tcp.Port.doRead.__code__.co_names, changed("tcp.Port.doRead's numberAccepts"))
        for adopt, expected in ((False, 3), (True, 1)):
            reactor = MemoryReactorClock()
            factory = Factory.forProtocol(Protocol)
            port = tcp.Port(0, factory, interface="127.0.0.1", reactor=reactor)
            port.startListening()
            self.addCleanup(port.socket.close)
            if adopt:
                self.assertTrue(acceptOneAtATime(port))
            clients = [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(3)]
            for client in clients:
                self.addCleanup(client.close)
            accepted: list[Any] = []
            factory.buildProtocol = lambda addr: accepted.append(addr) or Protocol()  # type: ignore[method-assign]
            port.doRead()
            self.assertEqual(len(accepted), expected, changed("tcp.Port.doRead's numberAccepts"))
            for transport in list(reactor.readers):
                if isinstance(transport, tcp.Server):
                    transport.socket.close()


class ServiceTripwires(SynchronousTestCase):
    """Endpoints, StreamServerEndpointService, twistd."""

    def test_serverEndpointAddress(self) -> None:
        """TCP and SSL server endpoints keep port, interface and backlog in C{_port}, C{_interface}, C{_backlog}."""
        from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString

        reactor = MemoryReactorClock()
        for description, expected in (
            ("tcp:8080:interface=127.0.0.1:backlog=7", (8080, "127.0.0.1", 7)),
            ("tcp6:8081:interface=\\:\\:1", (8081, "::1", 50)),
        ):
            self.assertEqual(serverEndpointAddress(serverFromString(reactor, description)), expected, changed("server endpoints' _port/_interface/_backlog"))
        ssl = SSL4ServerEndpoint(reactor, 8443, None, backlog=9, interface="10.0.0.1")  # type: ignore[arg-type]
        self.assertEqual(serverEndpointAddress(ssl), (8443, "10.0.0.1", 9), changed("SSL4ServerEndpoint's _port/_interface/_backlog"))

    def test_raiseSynchronously(self) -> None:
        """
        A StreamServerEndpointService logs an endpoint's immediate failure to
        listen, unless C{_raiseSynchronously} is set: then it raises.
        """

        class Failing:
            def listen(self, factory: Any) -> Deferred[Any]:
                return fail(CannotListenError("127.0.0.1", 1, OSError("in use")))

        quiet = StreamServerEndpointService(Failing(), Factory())
        events: list[Any] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        quiet.privilegedStartService()
        self.flushLoggedErrors(CannotListenError)
        loud = StreamServerEndpointService(Failing(), Factory())
        raiseListenErrorsAtStart(loud)
        self.assertRaises(CannotListenError, loud.privilegedStartService)

    def test_twistdLogFileInSignalHandler(self) -> None:
        """
        twistd, logging to a file, installs a SIGUSR1 handler whose closure holds
        its LogFile (the only place the file is kept but its observer's C{_outFile}).
        """
        from twisted.scripts._twistd_unix import UnixAppLogger

        previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        path = os.path.abspath(self.mktemp())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        observer = UnixAppLogger({"logfile": path, "nodaemon": False, "syslog": False})._getLogObserver()
        found = twistdLogFile()
        self.assertIsNotNone(found, changed("twistd's SIGUSR1 handler (rotateLog closure)"))
        self.addCleanup(found.close)
        self.assertEqual(found.path, path, changed("twistd's log file"))
        observer  # kept alive until here

    def test_exitStatusFromOwnStopHandlers(self) -> None:
        """
        twistd re-raises a stop signal after shutdown only when the reactor's
        C{_exitSignal} is set, which Twisted's own handlers do and LMGate's
        (L{lmgate.daemon.signals.StopSignalGuard}, installed once the reactor runs)
        do not: a drained stop exits 0 without resetting it.
        """
        import inspect

        from twisted.application import app
        from twisted.internet.base import ReactorBase
        from twisted.scripts import twistd

        from lmgate.daemon.signals import StopSignalGuard

        self.assertIn("_exitSignal", inspect.getsource(app.ApplicationRunner.startReactor), changed("twistd's exit by signal"))
        self.assertIn("_exitSignal", inspect.getsource(twistd.runApp), changed("twistd's exit by signal"))

        class Reactor:
            _exitSignal = None
            stops = 0

            def callFromThread(self, f: Any, *args: Any) -> None:
                f(*args)

            def stop(self) -> None:
                self.stops += 1

            def addSystemEventTrigger(self, *args: Any) -> None:
                self.install = args[2]

        twisted = Reactor()
        ReactorBase.sigTerm(twisted, signal.SIGTERM)  # type: ignore[arg-type]
        self.assertEqual(twisted._exitSignal, signal.SIGTERM, changed("ReactorBase.sigTerm"))
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        ours = Reactor()
        guard = StopSignalGuard(ours)
        guard.startService()
        ours.install()
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        self.assertEqual((ours.stops, ours._exitSignal), (1, None))


def _privateTwistedImports(source: str) -> list[str]:
    """The C{_}-prefixed Twisted modules and names a module's source imports."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "twisted" and any(p.startswith("_") for p in alias.name.split(".")):
                    found.append(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "twisted":
            if any(p.startswith("_") for p in node.module.split(".")):
                found.append(node.module)
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


class OneDoorTests(SynchronousTestCase):
    def test_onlyTheDoorImportsTwistedPrivates(self) -> None:
        """No module of lmgate but lmgate/relay/twistedprivate.py imports a private Twisted module or name."""
        offenders = {}
        for path in sorted((ROOT / "lmgate").rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative == DOOR:
                continue
            found = _privateTwistedImports(path.read_text())
            if found:
                offenders[relative] = found
        self.assertEqual(offenders, {}, "use lmgate.relay.twistedprivate's public names instead")
        self.assertTrue(_privateTwistedImports((ROOT / DOOR).read_text()))

    def test_checkerSeesPrivateImports(self) -> None:
        """The import check finds each form of private import."""
        self.assertEqual(
            _privateTwistedImports(
                "import twisted.web._newclient\n"
                "from twisted.web import _newclient\n"
                "from twisted.web.http import _escape, HTTPChannel\n"
                "from twisted.internet._sslverify import IOpenSSLTrustRoot\n"
                "from twisted.web.http import HTTPChannel\n"
                "from lmgate.x import _y\n"
            ),
            [
                "twisted.web._newclient",
                "twisted.web._newclient",
                "twisted.web.http._escape",
                "twisted.internet._sslverify",
            ],
        )
