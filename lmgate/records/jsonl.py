"""
The usage-record writer: complete JSON lines appended to C{stats.path},
flushed and fsynced off the reactor thread, rotated daily (UTC) and by size.
The access log is a second writer of the same kind (C{what="access log lines"},
no fsync) sharing the records' writer thread.

A proxied call hands its record over and moves on: C{write} only appends bytes
to a list. A flush takes the list as one batch to a single writer thread, which
appends it with C{O_APPEND}, fsyncs and closes. A failed batch (disk full, file
unwritable) is put back in front of the newer lines and tried again at the next
tick, in order; a batch that failed half-way is cut back to the last complete
line. Lines wait in memory up to C{backlog}; past it new lines are dropped,
counted, and logged once per interval. On stop, every line is written and
fsynced before the Deferred fires, so twistd exits only after that.

Files: C{stats.jsonl} is the current one; a rotated file is named with the UTC
day it was started on, C{stats.jsonl.2026-11-23}, and further rotations of that
day C{stats.jsonl.2026-11-23.1}, C{.2}, ... (chronological order by that number).
A rotation never overwrites an existing file.
"""

from __future__ import annotations

import errno
import os
import pwd
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from lmgate.errors import ConfigError
from lmgate.interfaces import IUsageSink
from lmgate.records.record import UsageRecord

log = Logger()

T = TypeVar("T")
RunInThread = Callable[[Callable[[], Any]], "Deferred[Any]"]


def utcDay(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d")


def checkStatsPath(
    path: str, source: str, key: str = "stats.path", owner: tuple[int, int] | None = None, mode: int | None = None
) -> None:
    """
    Make sure lines can be written to C{path}: its directory exists (created
    if need be) and the file can be opened for appending.

    @param owner: C{(uid, gid)} the daemon will run as, when it starts as root
        and twistd then drops privileges (C{--uid}/C{--gid}). The directories
        and the file created here are handed to that user, and the check is
        made as that user: it must be able to append to the file and create
        files beside it (a rotation, a reopen after SIGUSR1). Without this,
        root created them in the foreground and the daemon could then write
        none of its records.
    @param mode: the file's permissions when they must be exactly these (the
        audit log's C{0600}): the file is created so, directories created for
        it are C{0700}, and an existing file with other permissions is set to
        them. None: the records' C{0640}, an existing file left as it is.
    @raise ConfigError: naming C{key} (the setting the path came from) and the problem.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        created = _makeDirectories(directory, 0o777 if mode is None else 0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o640 if mode is None else mode)
            created.append(path)
        except FileExistsError:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            if mode is not None:
                _keepMode(fd, mode)
        finally:
            os.close(fd)
        if owner is not None:
            for made in created:
                os.chown(made, *owner)
    except OSError as e:
        raise ConfigError(source, key, f"cannot write {path}: {e.strerror or e}") from None
    if owner is not None:
        _checkAs(owner, path, directory, source, key)
    elif not os.access(directory, os.W_OK):
        raise ConfigError(source, key, f"cannot create files in {directory} (needed to rotate)")


def _keepMode(fd: int, mode: int) -> None:
    """Give the open file C{fd} exactly the permissions C{mode}, if it has others."""
    if os.fstat(fd).st_mode & 0o7777 != mode:
        os.fchmod(fd, mode)


def _makeDirectories(directory: str, mode: int = 0o777) -> list[str]:
    """Create C{directory} and its missing parents (with C{mode}, less the umask); the ones created, outermost first."""
    missing = []
    while not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    created = []
    for each in reversed(missing):
        try:
            os.mkdir(each, mode)
        except FileExistsError:
            continue
        created.append(each)
    return created


def _userName(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


@contextmanager
def _actingAs(uid: int, gid: int) -> Iterator[None]:
    """
    Take the effective identity twistd will switch to (user, group and the
    user's groups), and back to root afterwards. Only in the foreground, before
    any thread is started.
    """
    savedGroups, savedGid, savedUid = os.getgroups(), os.getegid(), os.geteuid()
    try:
        groups = os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except KeyError:
        groups = [gid]
    os.setgroups(groups)
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(savedUid)
        os.setegid(savedGid)
        os.setgroups(savedGroups)


def _checkAs(owner: tuple[int, int], path: str, directory: str, source: str, key: str) -> None:
    """As the user the daemon will run as: C{path} opens for appending, C{directory} takes new files."""
    user = _userName(owner[0])
    problem: str | None = None
    with _actingAs(*owner):
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        except OSError as e:
            problem = f"cannot write {path} as {user}: {e.strerror or e}"
        else:
            if not os.access(directory, os.W_OK | os.X_OK, effective_ids=True):
                problem = f"cannot create files in {directory} as {user} (needed to rotate)"
    if problem is not None:
        raise ConfigError(source, key, problem)


def _writeAll(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[written:]


@implementer(IUsageSink)
class UsageLog(Service):
    """
    Writes usage records to a rotating JSONL file without ever blocking a call.

    @ivar written: lines on disk (fsynced) since start.
    @ivar dropped: lines dropped because the backlog was full.
    @ivar lost: lines that could not be written before the writer stopped.
    """

    def __init__(
        self,
        path: str,
        reactor: IReactorTime,
        flushInterval: float = 1.0,
        maxBytes: int = 104857600,
        backlog: int = 100000,
        runInThread: RunInThread | None = None,
        what: str = "usage records",
        fsync: bool = True,
        mode: int | None = None,
    ) -> None:
        """
        @param reactor: the clock of the flush ticks and record days; without
            C{runInThread}, also the reactor the writer thread's results are
            handed back to (it must then provide L{IReactorFromThreads}).
        @param runInThread: runs a batch off the reactor thread (another
            writer's L{runInThread}, or L{synchronously} in tests); by default
            a thread of this writer's own, started with the service.
        @param mode: the file's exact permissions (the audit log's C{0600}):
            files are created so, and a file found with others (created by
            someone else, or loosened by hand) is set back before lines are
            appended to it; rotated files keep them (a rotation renames).
            None: created C{0640}, an existing file left as it is.
        """
        self.path, self._flushInterval, self._maxBytes, self._backlog = path, flushInterval, maxBytes, backlog
        self._clock = reactor
        self.what, self._fsync, self._mode = what, fsync, mode
        self._pending: list[bytes] = []
        self._flushing: Deferred[Any] | None = None
        self._pool: ThreadPool | None = None
        self._runInThread = runInThread
        self._fileDay: str | None = None  # the UTC day the current file was started on
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self.written = 0
        self.dropped = 0
        self.lost = 0  # lines still unwritten when the writer stopped
        self._droppedUnlogged = 0
        self._failing = False

    def runInThread(self, f: Callable[[], T]) -> Deferred[T]:
        """Run C{f} in this writer's thread (another writer can share it); only while running."""
        assert self._runInThread is not None, "the writer is not running"
        return self._runInThread(f)

    @property
    def pending(self) -> int:
        """Lines waiting to be written."""
        return len(self._pending)

    # -- IUsageSink ---------------------------------------------------------

    def write(self, record: UsageRecord) -> None:
        try:
            line = record.toLine()
        except Exception:
            self.dropped += 1
            log.failure("A usage record could not be serialised")
            return
        self.writeLine(line)

    def writeLine(self, line: bytes) -> None:
        """Queue one complete line (ending in a newline)."""
        if len(self._pending) >= self._backlog:
            self.dropped += 1
            self._droppedUnlogged += 1
            return
        self._pending.append(line)

    # -- lifetime -------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        if self._runInThread is None:
            reactor = IReactorFromThreads(self._clock)  # results come back on the reactor the writer was given
            pool = ThreadPool(minthreads=1, maxthreads=1, name="lmgate-stats")
            pool.start()
            self._pool = pool
            self._runInThread = lambda f: deferToThreadPool(reactor, pool, f)
        self._loop.start(self._flushInterval, now=False)

    async def _stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._flushing is not None:
            await self._flushing
        for attempt in range(2):
            if not self._pending:
                break
            await self._flush()
        self.lost = len(self._pending)
        if self._pending:
            log.error(
                "{count} {what} could not be written before stopping; they are lost",
                count=len(self._pending),
                what=self.what,
            )
        if self._pool is not None:
            self._pool.stop()
            self._pool = None
            self._runInThread = None

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    def reopen(self) -> None:
        """
        The file was renamed away (an external rotation tool): the next flush
        starts a new one. Every flush opens the file by its path, so nothing is
        ever written to the renamed file after this.
        """
        self._fileDay = None
        log.info("Reopening {path}", path=self.path)

    # -- flushing ---------------------------------------------------------------

    def _tick(self) -> None:
        if self._droppedUnlogged:
            log.error(
                "Dropped {count} {what}: {pending} are already waiting to be written",
                count=self._droppedUnlogged,
                what=self.what,
                pending=len(self._pending),
            )
            self._droppedUnlogged = 0
        if self._flushing is None and self._pending:
            self._flush()

    def _flush(self) -> Deferred[Any]:
        batch, self._pending = self._pending, []
        now = self._clock.seconds()
        assert self._runInThread is not None
        d = self._runInThread(lambda: self._writeBatch(batch, now))
        d.addCallbacks(self._flushed, self._flushFailed, callbackArgs=(batch,), errbackArgs=(batch,))
        self._flushing = d

        def done(result: object) -> None:
            self._flushing = None

        d.addBoth(done)
        return d

    def _flushed(self, result: object, batch: list[bytes]) -> None:
        self.written += len(batch)
        if self._failing:
            self._failing = False
            log.info("Writing {what} to {path} works again", what=self.what, path=self.path)

    def _flushFailed(self, reason: Failure, batch: list[bytes]) -> None:
        self._pending[:0] = batch  # first in line again, order kept
        if not self._failing:
            self._failing = True
            log.error(
                "Cannot write {what} to {path} ({why}); holding them in memory (up to {backlog})",
                what=self.what,
                path=self.path,
                why=reason.getErrorMessage(),
                backlog=self._backlog,
            )

    # -- in the writer thread ---------------------------------------------------

    def _writeBatch(self, batch: list[bytes], now: float) -> None:
        """Append C{batch}, rotating first where the day or the size says so."""
        today = utcDay(now)
        start = 0
        canRotate = True
        while start < len(batch):
            size = self._currentSize(today)
            if canRotate and self._fileDay is not None and self._fileDay != today and size > 0:
                canRotate = self._tryRotate()
                size = self._currentSize(today)
            if self._fileDay is None:
                self._fileDay = today
            room = self._maxBytes - size if canRotate else len(b"".join(batch[start:]))
            end = start
            total = 0
            while end < len(batch) and total + len(batch[end]) <= room:
                total += len(batch[end])
                end += 1
            if end == start:
                if size > 0 and canRotate:
                    canRotate = self._tryRotate()  # the next line does not fit: start a new file
                    continue
                end, total = start + 1, len(batch[start])  # a line larger than max_bytes gets a file of its own
            self._append(b"".join(batch[start:end]))
            start = end

    def _currentSize(self, today: str) -> int:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._fileDay = today
            return 0
        if self._fileDay is None:
            self._fileDay = utcDay(st.st_mtime) if st.st_size else today
        return st.st_size

    def _append(self, data: bytes) -> None:
        mode = self._mode
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640 if mode is None else mode)
        try:
            st = os.fstat(fd)
            before = st.st_size
            if mode is not None and st.st_mode & 0o7777 != mode:
                os.fchmod(fd, mode)
            try:
                _writeAll(fd, data)
                if self._fsync:
                    os.fsync(fd)
            except OSError:
                try:
                    os.ftruncate(fd, before)  # never leave a partial line behind
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)

    def _tryRotate(self) -> bool:
        """Rotate; on failure keep writing to the current file (logged) rather than lose records."""
        try:
            self._rotate()
        except OSError as e:
            log.error("Cannot rotate {path} ({why}); writing on in the current file", path=self.path, why=e)
            return False
        return True

    def _rotate(self) -> None:
        """Move the current file to its dated name, never over an existing file."""
        day = self._fileDay or utcDay(os.stat(self.path).st_mtime)
        base = f"{self.path}.{day}"
        for n in range(0, 100000):
            target = base if n == 0 else f"{base}.{n}"
            if os.path.exists(target) or os.path.exists(target + ".gz"):
                continue
            try:
                os.link(self.path, target)  # fails if target exists: no overwrite, even in a race
            except FileExistsError:
                continue
            os.unlink(self.path)
            break
        else:  # pragma: no cover
            raise OSError(errno.EEXIST, f"no free rotation name for {base}")
        self._fileDay = None
        log.info("Rotated {path} to {target}", path=self.path, target=target)


def synchronously(f: Callable[[], T]) -> Deferred[T]:
    """A C{runInThread} for tests: run now, in this thread."""
    try:
        return succeed(f())
    except BaseException:
        from twisted.internet.defer import fail

        return fail()
