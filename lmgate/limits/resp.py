"""
A lean Redis client for the usage-limits store: RESP2 over one Twisted
connection, commands pipelined, replies matched to callers in order.

The store needs a handful of commands (C{EVALSHA} and C{EVAL} for every
admission and settlement, C{SCRIPT LOAD}, C{SCAN}, and C{AUTH}/C{SELECT} when
connecting); each admission waits for one reply. A general client pays for
what the store never uses on every command: txredisapi, measured on the same
admissions and settlements (bench/RESULTS.md, 2026-12-01), spent about 250 µs
of CPU per admission and settlement, mostly building each argument, an
C{inlineCallbacks} generator per command and a reply timer per command. Here a
command is one C{bytes.join}, a reply one slice of the buffer and one callback;
no command has a timer of its own (the connection has one watchdog).

Deadlines are the caller's (the store adds its own timeout to each call); the
watchdog only drops a connection on which Redis stopped answering altogether,
so the next call reconnects instead of queueing behind a dead socket.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred, FirstError, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from lmgate.relay.eager import makeEager, noDelay

log = Logger()

#: A reply as the store reads it: text (bulk and simple strings, decoded as
#: UTF-8), an integer, None (a null bulk string or array), or a list of replies.
Reply = Any


class RedisError(Exception):
    """Redis answered the command with an error reply (C{NOSCRIPT ...}, C{ERR ...}, C{WRONGPASS ...})."""


class RedisConnectionError(ConnectionError):
    """The connection failed or was lost before Redis answered."""


class ProtocolError(Exception):
    """The bytes from the server are not RESP: the connection is dropped."""


def _arg(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, int) and not isinstance(value, bool):
        return b"%d" % value
    return str(value).encode("utf-8")


def encodeArgs(args: Sequence[object]) -> bytes:
    """
    Arguments as RESP bulk strings, without the array's header: a caller
    that sends many commands alike encodes their constant arguments once
    and joins (L{encodeCommand} makes a whole command).
    """
    parts: list[bytes] = []
    append = parts.append
    for value in args:
        kind = type(value)
        data = value.encode("utf-8") if kind is str else b"%d" % value if kind is int else _arg(value)  # type: ignore[attr-defined,str-format]
        append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def encodeCommand(args: Sequence[object]) -> bytes:
    """One command as RESP: an array of bulk strings."""
    return b"*%d\r\n%s" % (len(args), encodeArgs(args))


class _Incomplete(Exception):
    """The buffer ends inside a reply: wait for more bytes."""


#: Replies nested deeper than this are not Redis's: refuse rather than recurse for ever.
MAX_DEPTH = 32
#: A reply line (anything but a bulk string's bytes) longer than this is not Redis's.
MAX_LINE = 64 * 1024


class ReplyParser:
    """
    RESP2 replies from a byte stream fed in pieces split anywhere. Error
    replies come out as L{RedisError} instances (not raised): the caller
    hands each to the command it answers.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Reply]:
        """The replies completed by C{data}, in order. Raises L{ProtocolError} on bytes that are not RESP."""
        buffer = self._buffer + data if self._buffer else data
        replies: list[Reply] = []
        position = 0
        end = len(buffer)
        try:
            while position < end:
                reply, position = self._parse(buffer, position, 0)
                replies.append(reply)
        except _Incomplete:
            pass
        self._buffer = buffer[position:]
        if len(self._buffer) > MAX_LINE and self._buffer.find(b"\r\n") < 0:
            raise ProtocolError(f"a reply line longer than {MAX_LINE} bytes")
        return replies

    def _line(self, buffer: bytes, position: int) -> tuple[bytes, int]:
        stop = buffer.find(b"\r\n", position)
        if stop < 0:
            raise _Incomplete()
        return buffer[position + 1 : stop], stop + 2

    def _parse(self, buffer: bytes, position: int, depth: int) -> tuple[Reply, int]:
        kind = buffer[position]
        if kind == 0x24:  # $ bulk string
            line, start = self._line(buffer, position)
            size = _integer(line)
            if size < 0:
                return None, start
            stop = start + size
            if len(buffer) < stop + 2:
                raise _Incomplete()
            if buffer[stop : stop + 2] != b"\r\n":
                raise ProtocolError("a bulk string not ended by CRLF")
            return buffer[start:stop].decode("utf-8", "replace"), stop + 2
        if kind == 0x3A:  # : integer
            line, position = self._line(buffer, position)
            return _integer(line), position
        if kind == 0x2B:  # + simple string
            line, position = self._line(buffer, position)
            return line.decode("utf-8", "replace"), position
        if kind == 0x2D:  # - error
            line, position = self._line(buffer, position)
            return RedisError(line.decode("utf-8", "replace")), position
        if kind == 0x2A:  # * array
            if depth >= MAX_DEPTH:
                raise ProtocolError(f"a reply nested deeper than {MAX_DEPTH}")
            line, position = self._line(buffer, position)
            count = _integer(line)
            if count < 0:
                return None, position
            items = []
            for _ in range(count):
                if position >= len(buffer):
                    raise _Incomplete()
                item, position = self._parse(buffer, position, depth + 1)
                items.append(item)
            return items, position
        raise ProtocolError(f"an unknown reply type {bytes([kind])!r}")


def _integer(line: bytes) -> int:
    try:
        return int(line)
    except ValueError:
        raise ProtocolError(f"not an integer: {line[:40]!r}") from None


class RedisProtocol(Protocol):
    """
    One connection: commands written as they come (pipelined), each reply
    handed to the oldest command waiting. A command whose caller gave up
    (its Deferred cancelled) still takes its reply, which is dropped.

    @ivar replyTimeout: seconds without a reply while commands wait, after
        which the connection is dropped (every waiting command fails with
        L{RedisConnectionError}).
    @ivar onLost: called once when the connection is lost (the client's hook).
    """

    def __init__(self, clock: IReactorTime, replyTimeout: float) -> None:
        self._clock = clock
        self.replyTimeout = replyTimeout
        self._parser = ReplyParser()
        self._waiting: deque[Deferred[Reply]] = deque()
        self._lastProgress = 0.0
        self._watchdog: LoopingCall | None = None
        self.connected = False
        self._eager = False
        self._gathered: list[bytes] = []
        self._gathering: Any = None
        self._refusal = "not connected to Redis"
        self.onLost: Callable[[], None] | None = None

    def connectionMade(self) -> None:
        self.connected = True
        # A command on an idle connection is sent at once, not on the reactor's
        # next turn (an admission waits for its answer: the turn would be added
        # to every call); while others wait for answers, the commands of one
        # turn are gathered into one write (one system call, and one wake-up
        # of Redis, for a busy worker's many admissions).
        self._eager = makeEager(self.transport)
        # Nagle off, as Redis's own clients do: a command written while an
        # earlier one's bytes await their acknowledgement leaves at once
        # instead of after that command's reply.
        noDelay(self.transport)
        self._watchdog = LoopingCall(self._watch)
        self._watchdog.clock = self._clock
        self._watchdog.start(max(0.01, self.replyTimeout / 2), now=False)

    def refuse(self, why: str) -> None:
        """Fail every command from now on with C{why}, and close the connection."""
        self.connected = False
        self._refusal = why
        if self.transport is not None:
            self.transport.loseConnection()

    def execute(self, *args: object) -> Deferred[Reply]:
        """Send one command; a Deferred of its reply (L{RedisError} for an error reply)."""
        if not self.connected:
            return fail(RedisConnectionError(self._refusal))
        return self.send(encodeCommand(args))

    def send(self, data: bytes) -> Deferred[Reply]:
        """Send one command already encoded (L{encodeCommand}); a Deferred of its reply."""
        if not self.connected:
            return fail(RedisConnectionError(self._refusal))
        d: Deferred[Reply] = Deferred()
        idle = not self._waiting
        if idle:
            self._lastProgress = self._clock.seconds()
        self._waiting.append(d)
        if idle or not self._eager:
            self.transport.write(data)  # type: ignore[union-attr]
        else:
            self._gathered.append(data)
            if self._gathering is None:
                self._gathering = self._clock.callLater(0, self._sendGathered)
        return d

    def _sendGathered(self) -> None:
        self._gathering = None
        gathered, self._gathered = self._gathered, []
        if gathered and self.connected:
            self.transport.write(b"".join(gathered))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except ProtocolError as e:
            log.warn("Redis sent bytes that are not RESP ({why}): dropping the connection", why=str(e))
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if replies:
            self._lastProgress = self._clock.seconds()
        waiting = self._waiting
        for reply in replies:
            if not waiting:
                log.warn("Redis sent a reply nobody asked for: dropping the connection")
                self.transport.abortConnection()  # type: ignore[union-attr]
                return
            d = waiting.popleft()
            if d.called:
                continue  # its caller gave up
            if isinstance(reply, RedisError):
                d.errback(reply)
            else:
                d.callback(reply)

    def _watch(self) -> None:
        if self._waiting and self._clock.seconds() - self._lastProgress > self.replyTimeout:
            log.warn("Redis did not answer for {seconds} s: dropping the connection", seconds=self.replyTimeout)
            self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(ConnectionError("lost"))) -> None:
        self.connected = False
        if self._gathering is not None:
            self._gathering.cancel()
            self._gathering = None
        self._gathered = []
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            if not d.called:
                d.errback(RedisConnectionError(f"the Redis connection was lost: {reason.getErrorMessage()}"))
        if self.onLost is not None:
            onLost, self.onLost = self.onLost, None
            onLost()


class RedisClient:
    """
    A reconnecting connection to one Redis: authenticates and selects the
    database on each connection before any command goes out, and reconnects
    with a short backoff (0.1 s, doubling to 1 s) whenever it is lost or could
    not be made.

    L{execute} sends on the live connection; while there is none, the command
    waits for the next one, in order (the caller's deadline bounds the wait:
    cancelling its Deferred withdraws it).
    """

    initialDelay = 0.1
    maxDelay = 1.0

    def __init__(
        self,
        endpoint: Any,
        clock: IReactorTime,
        replyTimeout: float = 10.0,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
    ) -> None:
        self._endpoint = endpoint
        self._clock = clock
        self._replyTimeout = replyTimeout
        self._username = username
        self._password = password
        self._db = db
        self._running = False
        self._protocol: RedisProtocol | None = None
        self._connecting: Deferred[Any] | None = None
        self._retry: Any = None
        self._delay = self.initialDelay
        self._waiters: list[Deferred[RedisProtocol]] = []
        self._stopping: Deferred[None] | None = None

    def start(self) -> None:
        """Start connecting (and reconnecting)."""
        self._running = True
        self._connect()

    def stop(self) -> Deferred[None]:
        """Stop reconnecting and disconnect; commands waiting for a connection fail. Fires when the connection is gone."""
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._connecting is not None:
            self._connecting.cancel()
        self._failWaiters("the Redis client is stopped")
        protocol, self._protocol = self._protocol, None
        if protocol is None or protocol.transport is None or not protocol.connected:
            return succeed(None)
        self._stopping = Deferred()
        protocol.transport.loseConnection()
        return self._stopping

    def _connect(self) -> None:
        self._retry = None
        factory = Factory.forProtocol(lambda: RedisProtocol(self._clock, self._replyTimeout))
        self._connecting = self._endpoint.connect(factory)
        self._connecting.addCallbacks(self._made, self._notMade)

    def _notMade(self, f: Failure) -> None:
        self._connecting = None
        log.debug("Redis connection not made: {why}", why=f.getErrorMessage())
        self._retryLater()

    def _retryLater(self) -> None:
        if not self._running or self._retry is not None:
            return
        self._retry = self._clock.callLater(self._delay, self._connect)
        self._delay = min(self.maxDelay, self._delay * 2)

    def _made(self, protocol: RedisProtocol) -> None:
        self._connecting = None
        protocol.onLost = self._lost
        if not self._running:
            protocol.refuse("the Redis client is stopped")
            return
        steps: list[tuple[object, ...]] = []
        if self._password is not None:
            steps.append(("AUTH", self._username, self._password) if self._username else ("AUTH", self._password))
        if self._db:
            steps.append(("SELECT", self._db))
        if not steps:
            self._ready(protocol)
            return

        def refused(f: Failure) -> None:
            why = f.value.subFailure if f.check(FirstError) else f  # type: ignore[union-attr]
            log.warn("Redis refused the connection's set-up: {why}", why=why.getErrorMessage())
            protocol.refuse(f"Redis refused the connection: {why.getErrorMessage()}")
            self._failWaiters(f"Redis refused the connection: {why.getErrorMessage()}")

        prepared: Deferred[Any] = gatherResults([protocol.execute(*step) for step in steps], consumeErrors=True)
        prepared.addCallbacks(lambda _: self._ready(protocol), refused)

    def _ready(self, protocol: RedisProtocol) -> None:
        if not protocol.connected:
            return  # lost while being set up: _lost retries
        self._protocol = protocol
        self._delay = self.initialDelay
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(protocol)

    def _failWaiters(self, why: str) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(RedisConnectionError(why))

    def _lost(self) -> None:
        if self._protocol is not None and not self._protocol.connected:
            self._protocol = None
        if self._stopping is not None:
            stopping, self._stopping = self._stopping, None
            stopping.callback(None)
        self._retryLater()

    def execute(self, *args: object) -> Deferred[Reply]:
        """One command's reply, on the live connection or the next one."""
        return self.send(encodeCommand(args))

    def send(self, data: bytes) -> Deferred[Reply]:
        """One command already encoded (L{encodeCommand}): its reply, on the live connection or the next one."""
        protocol = self._protocol
        if protocol is not None and protocol.connected:
            return protocol.send(data)
        if not self._running:
            return fail(RedisConnectionError("the Redis client is stopped"))
        waiter: Deferred[RedisProtocol] = Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(waiter)
        return waiter.addCallback(lambda p: p.send(data))
