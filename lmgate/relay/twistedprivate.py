"""
The one door to Twisted's private names.

Every private Twisted name LMGate uses (a module, class, function or attribute
whose name starts with C{_}, or an undocumented detail of how a Twisted class
works) is used here and nowhere else; the rest of LMGate uses the public names
of this module. Each use says what it relies on and why no public API does it,
and C{tests/test_twistedprivate.py} has a tripwire for each: after a Twisted
upgrade, run C{python -m twisted.trial tests.test_twistedprivate} first
(docs/operations.md, "Upgrading Twisted"). setup.cfg pins Twisted below the
next major version for the same reason.

Nothing here patches Twisted process-wide: every use is a subclass, or acts on
one object LMGate made.
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Iterable

from twisted.internet import tcp
from twisted.internet.defer import Deferred

# Private: the interface a trust root passed to BrowserLikePolicyForHTTPS
# (optionsForClientTLS) provides. Twisted's public trust roots are either the
# platform's (platformTrust) or a list of certificates (trustRootFromCertificates);
# none is "the platform's plus a bundle", so LMGate implements the interface.
from twisted.internet._sslverify import IOpenSSLTrustRoot

# Private: the HTTP/1.1 client (response parser, protocol, request). twisted.web's
# public client is the Agent, which offers no way to bound or check a response's
# head, nor to choose the parser, protocol or request object.
from twisted.web import _newclient
from twisted.web.client import HTTPConnectionPool

# Private: the factory HTTPConnectionPool builds its connections' protocols with
# (its class attribute _factory); the pool has no public parameter for the protocol.
from twisted.web.client import _HTTP11ClientFactory

# Private: HTTPChannel's chunked request-body decoder and the access log's escaping.
from twisted.web.http import HTTPChannel, _ChunkedTransferDecoder, _escape
from twisted.web.iweb import IResponse
from zope.interface import implementer

__all__ = [
    "RESPONSE_STATUS",
    "RESPONSE_HEADER",
    "RelayResponseParser",
    "RelayClientProtocol",
    "RelayConnectionPool",
    "clientRequest",
    "PlatformTrustAndBundle",
    "InspectableHTTPChannel",
    "decodeChunkedPrefix",
    "accessLogEscape",
    "WRITE_STATE",
    "hasWriteState",
    "canSendAtOnce",
    "adoptSubclass",
    "acceptOneAtATime",
    "serverEndpointAddress",
    "raiseListenErrorsAtStart",
    "twistdLogFile",
]


# -- the relay's upstream connections (twisted.web._newclient) ----------------

#: The response parser's states while it reads the status line and the header
#: lines (module constants of the private twisted.web._newclient; the parser's
#: C{state} attribute holds one of them).
RESPONSE_STATUS: str = _newclient.STATUS
RESPONSE_HEADER: str = _newclient.HEADER


class _HeldPause:
    """
    Stands in for the connection while the response Deferred runs: pause and
    resume are noted, not done; everything else goes through. See
    L{RelayResponseParser.allHeadersReceived}.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.last: str | None = None  # "pause" or "resume": the call that counts

    def pauseProducing(self) -> None:
        self.last = "pause"

    def resumeProducing(self) -> None:
        self.last = "resume"

    def stopProducing(self) -> None:
        self._transport.stopProducing()

    def loseConnection(self) -> None:
        self._transport.loseConnection()

    def settle(self) -> None:
        """Do what the last call asked for (a connection's pause and resume are not counted)."""
        if self.last == "pause":
            self._transport.pauseProducing()
        elif self.last == "resume":
            self._transport.resumeProducing()


class RelayResponseParser(_newclient.HTTPClientParser):
    """
    Twisted's HTTP/1.1 response parser (private: C{_newclient.HTTPClientParser}),
    as the base of the relay's own; its C{state} is L{RESPONSE_STATUS} or
    L{RESPONSE_HEADER} while the head is read.

    One change of Twisted's behaviour: Twisted pauses the connection when the
    head is complete (no body bytes before a protocol is given to the
    response) and the relay, handed the response in the same call, resumes it
    at once: two C{epoll_ctl} system calls per call for nothing. The pause and
    resume made while the response Deferred runs are held, and only the last
    one is done, so a response whose body is asked for later is still paused,
    and one relayed at once never is.
    """

    def allHeadersReceived(self) -> None:
        # Private: the parser's transport is a TransportProxyProducer whose
        # _producer is the connection; it is swapped for the time of Twisted's
        # allHeadersReceived (which pauses it, then fires the response Deferred).
        # Twisted has no public way to receive a response's body without that pause.
        proxy = self.transport
        real = getattr(proxy, "_producer", None)
        if not isinstance(proxy, _newclient.TransportProxyProducer) or real is None:
            super().allHeadersReceived()
            return
        held = _HeldPause(real)
        proxy._producer = held
        try:
            super().allHeadersReceived()
        finally:
            if proxy._producer is held:
                proxy._producer = real
            held.settle()


class RelayClientProtocol(_newclient.HTTP11ClientProtocol):
    """
    Twisted's HTTP/1.1 client connection (private: C{_newclient.HTTP11ClientProtocol}),
    reading each response with L{parserClass}.
    """

    #: The parser each request's response is read with (a subclass of L{RelayResponseParser}).
    parserClass: type[RelayResponseParser] = RelayResponseParser

    def request(self, request: Any) -> Deferred[IResponse]:
        # Private: HTTP11ClientProtocol.request builds its parser from the module
        # global HTTPClientParser, keeps it in _parser and connects it before it
        # returns; no byte reaches it before the reactor's next read. There is no
        # hook to choose the parser, so the fresh parser of this connection, and
        # only it, is given the subclass (which adds methods, no instance state).
        # Nothing module-wide changes: other HTTP clients in the process keep
        # Twisted's parser.
        before = getattr(self, "_parser", None)
        result: Deferred[IResponse] = super().request(request)
        parser = getattr(self, "_parser", None)
        if parser is not before and type(parser) is _newclient.HTTPClientParser:
            parser.__class__ = self.parserClass
        return result


class _ProtocolFactory(_HTTP11ClientFactory):
    """Twisted's factory for a pool's connections, building a given protocol class."""

    noisy = False  # no "Starting factory" log line per upstream connection

    def __init__(self, quiescentCallback: Callable[[Any], None], metadata: str, protocolClass: type[Any]) -> None:
        _HTTP11ClientFactory.__init__(self, quiescentCallback, metadata)
        self._protocolClass = protocolClass

    def buildProtocol(self, addr: Any) -> Any:
        # Private: _quiescentCallback is how the factory hands the pool's callback
        # (a connection back to the pool when idle) to each protocol.
        return self._protocolClass(self._quiescentCallback)


class RelayConnectionPool(HTTPConnectionPool):
    """
    Twisted's persistent connection pool, whose connections are L{protocolClass},
    opened quietly.
    """

    #: The protocol of every new connection (a subclass of L{RelayClientProtocol}).
    protocolClass: type[RelayClientProtocol] = RelayClientProtocol

    def _factory(self, quiescentCallback: Callable[[Any], None], metadata: str) -> _ProtocolFactory:  # type: ignore[override]
        # Private: HTTPConnectionPool._newConnection calls
        # self._factory(quiescentCallback, repr(endpoint)) for the factory of each
        # new connection (a class attribute in Twisted; a method here, so that the
        # protocol class is the pool's). The pool has no public parameter for it.
        return _ProtocolFactory(quiescentCallback, metadata, self.protocolClass)


#: C{clientRequest(method, target, headers, bodyProducer, persistent=..., parsedURI=...)}:
#: the request object an HTTP11ClientProtocol sends, with its parsed URI set as
#: Agent sets it. Private: C{_newclient.Request._construct}; the public
#: constructor cannot set the parsed URI (C{Request.absoluteURI}, which
#: Twisted's response and redirect handling read). An alias, not a wrapper: it
#: runs once per relayed call.
clientRequest: Callable[..., Any] = _newclient.Request._construct


@implementer(IOpenSSLTrustRoot)
class PlatformTrustAndBundle:
    """
    The platform's CAs plus a private bundle, so an operator's internal CA is
    added to, not swapped for, the usual trust.

    Private: the interface (C{twisted.internet._sslverify.IOpenSSLTrustRoot}) and
    its one method C{_addCACertsToContext}, which C{optionsForClientTLS} calls
    with the OpenSSL context. No public trust root adds to the platform's.
    """

    def __init__(self, caBundle: str) -> None:
        self._caBundle = caBundle

    def _addCACertsToContext(self, context: Any) -> None:
        context.set_default_verify_paths()
        context.load_verify_locations(self._caBundle)


# -- the clients' side: twisted.web.http ------------------------------------


class InspectableHTTPChannel(HTTPChannel):
    """
    Twisted's C{HTTPChannel} with what a stricter channel needs of its state
    under public names. HTTPChannel keeps the request line, the bytes not parsed
    yet, the body decoder and its abort timer in private attributes, and answers
    a malformed request from a private method; these are read and replaced here only.
    """

    @property
    def handlingRequest(self) -> bool:
        """Whether a request is being answered (private: C{_handlingRequest})."""
        return bool(self._handlingRequest)

    def requestLine(self) -> tuple[bytes, bytes, bytes] | None:
        """
        The request line under way (method, target, version), if one was parsed.
        Private: C{_command}, C{_path}, C{_version}, set by C{lineReceived} for
        the request line; the C{Request} object gets them only once the body is read.
        """
        command = getattr(self, "_command", None)
        if command is None:
            return None
        return command, self._path, self._version

    def bufferedBytes(self) -> bytes:
        """
        The bytes received and not parsed yet (after the headers: the body's
        first bytes). Private: LineReceiver's C{_buffer}.
        """
        return bytes(self._buffer)

    def stopBodyDecoding(self) -> None:
        """
        Forget the request body's decoder: what arrives next is not handed on.
        Private: C{_transferDecoder}, which C{rawDataReceived} feeds.
        """
        self._transferDecoder = None

    def scheduleAbort(self, delay: float) -> None:
        """
        Cut the connection in C{delay} seconds (L{forceAbortClient}) unless it
        closes first. Private: C{_abortingCall}, which C{connectionLost} cancels.
        """
        self._abortingCall = self.callLater(delay, self.forceAbortClient)

    def abortScheduled(self) -> bool:
        """Whether a cut is scheduled (L{scheduleAbort}, or Twisted's own timeout)."""
        return self._abortingCall is not None

    def abortFired(self) -> None:
        """The scheduled cut has run: nothing is left to cancel."""
        self._abortingCall = None

    def badRequestReceived(self) -> None:
        """
        A malformed request line, header or framing: Twisted answers a bare 400
        and closes. Subclasses answer their own way.
        """
        HTTPChannel._respondToBadRequestAndDisconnect(self)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Private: every one of HTTPChannel's own refusals (request line, header,
        # chunked framing, conflicting lengths) goes through this method; there is
        # no public hook for them.
        self.badRequestReceived()


def decodeChunkedPrefix(data: bytes) -> bytes:
    """
    The body bytes a chunked request body's first C{data} holds, up to a
    malformed chunk (or the end of C{data}). Private: twisted.web's
    C{_ChunkedTransferDecoder}, the decoder HTTPChannel itself uses; there is no
    public chunked decoder.
    """
    parts: list[bytes] = []
    decoder = _ChunkedTransferDecoder(parts.append, lambda rest: None)
    try:
        decoder.dataReceived(data)
    except Exception:  # a malformed chunk: what decoded before it
        pass
    return b"".join(parts)


#: twisted.web's escaping of a value in the combined access-log format (a
#: C{repr}, requoted for double quotes), so that LMGate's lines are the same as
#: Twisted's. Private: C{twisted.web.http._escape}, the function
#: C{combinedLogFormatter} uses.
accessLogEscape: Callable[[bytes | str], str] = _escape


# -- TCP transports and ports (twisted.internet.tcp) ---------------------------

#: The parts of Twisted's FileDescriptor/tcp.Connection that L{canSendAtOnce}
#: reads; a Twisted whose transports lack them keeps its own writes
#: (L{hasWriteState}).
WRITE_STATE = ("connected", "disconnecting", "_writeDisconnected", "TLS", "_tempDataLen", "offset", "dataBuffer",
               "producer", "streamingProducer", "producerPaused", "writeSomeData")


def hasWriteState(transport: Any) -> bool:
    """Whether C{transport} has every attribute L{canSendAtOnce} reads."""
    return all(hasattr(transport, name) for name in WRITE_STATE)


def canSendAtOnce(transport: Any) -> bool:
    """
    Whether a TCP transport can send a write now, bypassing its queue, without
    changing what Twisted would do: connected, not closing, not TLS, nothing
    queued, and no pull producer (driven by the queue draining) or paused one.

    Private: FileDescriptor keeps its queue in C{_tempDataLen} (bytes not yet
    joined into C{dataBuffer}), C{dataBuffer} and C{offset}, and notes a
    C{loseWriteConnection} in C{_writeDisconnected}; no public method tells
    whether a transport has anything queued. Used as the method C{_sendNow}
    of L{lmgate.relay.eager}'s transports (no call in between: every write asks).
    """
    return bool(
        transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport.TLS
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
        and (transport.producer is None or (transport.streamingProducer and not transport.producerPaused))
    )


def adoptSubclass(instance: Any, subclass: type) -> None:
    """
    Make a live object of a Twisted class an instance of C{subclass}, which
    adds or overrides methods and keeps no state of its own in C{__init__}.

    Undocumented: Twisted builds its TCP transports and ports itself (the
    reactor's C{listenTCP}/C{adoptStreamPort}, a port's C{doRead}) and takes no
    class for them; changing the class of the one object is the only way to
    change its behaviour without changing every such object in the process.

    @raise TypeError: C{subclass} is not a subclass of the object's class.
    """
    if type(instance) not in subclass.__mro__[1:]:
        raise TypeError(f"{subclass.__name__} is not a subclass of {type(instance).__name__}")
    instance.__class__ = subclass


class _OneAcceptAtATime(tcp.Port):
    """
    A listening port that accepts one connection per wake-up. Undocumented:
    C{tcp.Port.doRead} accepts up to C{numberAccepts} connections per wake-up
    and raises it as traffic grows (assigning it); here it stays 1.
    """

    @property
    def numberAccepts(self) -> int:
        return 1

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        pass


def acceptOneAtATime(port: Any) -> bool:
    """
    Make a plain TCP listening port accept one connection per wake-up (see
    L{_OneAcceptAtATime}); any other kind of port is left as it is.

    @return: whether the port now accepts one at a time.
    """
    if type(port) is tcp.Port:
        adoptSubclass(port, _OneAcceptAtATime)
    return isinstance(port, _OneAcceptAtATime)


# -- endpoints, services, twistd ---------------------------------------------


def serverEndpointAddress(endpoint: Any) -> tuple[int, str, int]:
    """
    C{(port, interface, backlog)} of a TCP or SSL server endpoint (as
    C{serverFromString} builds it). Private: the endpoints keep them in
    C{_port}, C{_interface} and C{_backlog}, and have no public accessor;
    LMGate binds the same address itself (a foreground check, the workers'
    shared socket).
    """
    return endpoint._port, endpoint._interface, endpoint._backlog


def raiseListenErrorsAtStart(service: Any) -> None:
    """
    Make a C{StreamServerEndpointService} raise from C{privilegedStartService}
    when its endpoint fails to listen at once (instead of logging the failure
    and running without a listener). Private: C{_raiseSynchronously}, which
    Twisted's public C{strports.service} sets the same way on the service it
    builds from a description; LMGate's listener is a subclass built from an
    endpoint already checked in the foreground, and the class has no public
    parameter for it.
    """
    service._raiseSynchronously = True


def twistdLogFile() -> Any:
    """
    The log file twistd opened for C{--logfile}, if any (a
    L{twisted.python.logfile.LogFile}), else None.

    Undocumented: twistd keeps the file only in the closure of the SIGUSR1
    handler it installs (which would I{rotate} it: a second rotation on top of
    logrotate's; LMGate reopens it instead) and in its log observer's private
    C{_outFile}. twistd builds its observer before the plugin's service starts
    and offers no way to reach it or replace it but its C{--logger} option
    (which the operator's command line would have to name) or an
    C{ILogObserver} component on the application (which only a C{.tac} file
    can set: for a plugin, twistd makes the application itself).
    """
    handler = signal.getsignal(signal.SIGUSR1)
    cells: Iterable[Any] = getattr(handler, "__closure__", None) or ()
    for cell in cells:
        candidate = cell.cell_contents
        if hasattr(candidate, "reopen") and hasattr(candidate, "rotate"):
            return candidate
    return None
