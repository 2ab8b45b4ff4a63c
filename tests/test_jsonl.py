"""The usage-record writer, on a fake clock with writes run in the test's thread."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from datetime import datetime, timezone
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from lmgate.records import jsonl
from lmgate.errors import ConfigError
from lmgate.records.jsonl import UsageLog, checkStatsPath, synchronously
from lmgate.records.record import UsageRecord

BEFORE_MIDNIGHT = datetime(2026, 11, 23, 23, 59, 58, tzinfo=timezone.utc).timestamp()


def record(n: int) -> UsageRecord:
    return UsageRecord(
        timestamp="2026-11-23T00:00:00.000Z", request_id=f"r{n}", lmgate_id="a", owner="o", key="sk-…1234",
        provider="openai", method="POST", endpoint="/openai/v1/chat/completions", model="m", status=200,
        streaming=False, input_tokens=n, output_tokens=1, cached_tokens=None, cache_write_tokens=None,
        reasoning_tokens=None, total_tokens=n + 1, usage_source="response", latency_ms=1.0, ttfb_ms=0.5,
        request_bytes=2, response_bytes=3, upstream_request_id=None, client="127.0.0.1", error=None,
    )


@implementer(IReactorFromThreads)
class ThreadsClock(Clock):
    """A fake clock that is also a reactor a thread can hand results to (at once)."""

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class WriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "stats.jsonl")
        self.clock = Clock()
        self.clock.advance(BEFORE_MIDNIGHT - 3600)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def writer(self, **kwargs: Any) -> UsageLog:
        log = UsageLog(self.path, self.clock, runInThread=synchronously, **kwargs)
        log.startService()
        self.addCleanup(lambda: log.running and log.stopService())
        return log

    def lines(self, name: str = "stats.jsonl") -> list[dict[str, Any]]:
        with open(os.path.join(self.directory, name), "rb") as f:
            return [json.loads(line) for line in f]

    def errors(self) -> list[str]:
        return [e["log_format"] for e in self.events if e.get("log_level") is not None and e["log_level"].name == "error"]

    def test_flushedEachInterval(self) -> None:
        """Nothing is written before the flush interval; then every line, in order."""
        log = self.writer(flushInterval=1.0)
        for n in range(5):
            log.write(record(n))
        self.assertFalse(os.path.exists(self.path) and os.path.getsize(self.path))
        self.clock.advance(1.0)
        self.assertEqual([r["request_id"] for r in self.lines()], ["r0", "r1", "r2", "r3", "r4"])
        self.assertEqual((log.written, log.pending), (5, 0))

    def test_ownThreadReportsToTheGivenReactor(self) -> None:
        """
        Without a C{runInThread}, the writer runs its batches in a thread of its
        own whose results come back on the reactor it was given, not on
        Twisted's global one.
        """
        clock = ThreadsClock()
        clock.advance(BEFORE_MIDNIGHT - 3600)
        handedTo: list[object] = []

        def deferToThreadPool(reactor: object, pool: object, f: Any) -> Deferred[Any]:
            handedTo.append(reactor)
            return succeed(f())  # the batch itself runs here: the test stays in one thread

        self.patch(jsonl, "deferToThreadPool", deferToThreadPool)
        log = UsageLog(self.path, clock, flushInterval=1.0)
        log.startService()
        self.addCleanup(lambda: log.running and log.stopService())
        log.write(record(1))
        clock.advance(1.0)
        self.assertEqual(([r["request_id"] for r in self.lines()], handedTo), (["r1"], [clock]))
        self.successResultOf(log.stopService())

    def test_stopFlushesEverything(self) -> None:
        """Stopping writes every pending line before its Deferred fires."""
        log = self.writer(flushInterval=60)
        log.write(record(1))
        self.successResultOf(log.stopService())
        self.assertEqual(len(self.lines()), 1)

    def test_rotatesAtUTCMidnight(self) -> None:
        """The first flush of a new UTC day moves yesterday's file to its dated name."""
        self.clock.advance(3600)  # to 23:59:58
        log = self.writer()
        log.write(record(1))
        self.clock.advance(1)
        log.write(record(2))
        self.clock.advance(2)  # 00:00:01 on the 24th
        self.assertEqual([r["request_id"] for r in self.lines("stats.jsonl.2026-11-23")], ["r1"])
        self.assertEqual([r["request_id"] for r in self.lines()], ["r2"])

    def test_rotatesBySizeWithoutOverwriting(self) -> None:
        """Past max_bytes a file is rotated between lines; an existing rotated file is never overwritten."""
        size = len(record(1).toLine())
        with open(self.path + ".2026-11-23", "wb") as f:
            f.write(b"keep me\n")
        log = self.writer(maxBytes=size * 3)
        for n in range(7):
            log.write(record(n))
        self.clock.advance(1)
        names = sorted(n for n in os.listdir(self.directory))
        self.assertEqual(names, ["stats.jsonl", "stats.jsonl.2026-11-23", "stats.jsonl.2026-11-23.1", "stats.jsonl.2026-11-23.2"])
        with open(self.path + ".2026-11-23", "rb") as f:
            self.assertEqual(f.read(), b"keep me\n")
        ids = [r["request_id"] for name in names[2:] + names[:1] for r in self.lines(name)]
        self.assertEqual(ids, [f"r{n}" for n in range(7)])
        for name in names[1:]:
            self.assertLessEqual(os.path.getsize(os.path.join(self.directory, name)), size * 3)

    def test_oldFileRotatedAtStart(self) -> None:
        """A stats file left from an earlier day is rotated under that day before new lines go in."""
        with open(self.path, "wb") as f:
            f.write(record(0).toLine())
        old = datetime(2026, 11, 20, 12, tzinfo=timezone.utc).timestamp()
        os.utime(self.path, (old, old))
        log = self.writer()
        log.write(record(1))
        self.clock.advance(1)
        self.assertEqual([r["request_id"] for r in self.lines("stats.jsonl.2026-11-20")], ["r0"])
        self.assertEqual([r["request_id"] for r in self.lines()], ["r1"])

    def test_diskFullThenRecovery(self) -> None:
        """A failing write leaves no partial line, keeps the batch, logs once, and is retried in order."""
        log = self.writer()
        log.write(record(0))
        self.clock.advance(1)
        real = jsonl._writeAll

        def halfThenFull(fd: int, data: bytes) -> None:
            os.write(fd, data[: len(data) // 2 + 1])
            raise OSError(errno.ENOSPC, "No space left on device")

        jsonl._writeAll = halfThenFull  # type: ignore[assignment]
        try:
            log.write(record(1))
            self.clock.advance(1)
            log.write(record(2))
            self.clock.advance(1)
            self.assertEqual([r["request_id"] for r in self.lines()], ["r0"])  # complete lines only
            self.assertEqual(log.pending, 2)
            self.assertEqual(len([e for e in self.errors() if "Cannot write" in e]), 1)
        finally:
            jsonl._writeAll = real  # type: ignore[assignment]
        self.clock.advance(1)
        self.assertEqual([r["request_id"] for r in self.lines()], ["r0", "r1", "r2"])

    def test_backlogBound(self) -> None:
        """Past the backlog, new records are dropped, counted, and logged once per interval."""
        log = self.writer(backlog=3)
        jsonl_write = jsonl._writeAll

        def full(fd: int, data: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        jsonl._writeAll = full  # type: ignore[assignment]
        try:
            for n in range(10):
                log.write(record(n))
            self.clock.advance(1)
            self.assertEqual((log.pending, log.dropped), (3, 7))
            self.assertEqual(len([e for e in self.errors() if "Dropped" in e]), 1)
        finally:
            jsonl._writeAll = jsonl_write  # type: ignore[assignment]
        self.clock.advance(1)
        self.assertEqual([r["request_id"] for r in self.lines()], ["r0", "r1", "r2"])

    def test_reopenAfterExternalRename(self) -> None:
        """After an external rename and reopen(), lines go to a new file at the path."""
        log = self.writer()
        log.write(record(1))
        self.clock.advance(1)
        os.rename(self.path, self.path + ".old")
        log.reopen()
        log.write(record(2))
        self.clock.advance(1)
        self.assertEqual([r["request_id"] for r in self.lines("stats.jsonl.old")], ["r1"])
        self.assertEqual([r["request_id"] for r in self.lines()], ["r2"])

    def test_checkStatsPath(self) -> None:
        """An unusable stats path is one start-up line naming stats.path."""
        checkStatsPath(os.path.join(self.directory, "new", "dir", "s.jsonl"), "cfg.yaml")
        blocker = os.path.join(self.directory, "file")
        open(blocker, "w").close()
        with self.assertRaises(ConfigError) as e:
            checkStatsPath(os.path.join(blocker, "s.jsonl"), "cfg.yaml")
        self.assertTrue(str(e.exception).startswith("cfg.yaml: stats.path: cannot write"))

    def test_checkStatsPathForTheServiceUser(self) -> None:
        """
        Started as root for a service user: the directories and the file created
        are that user's, an existing one is left as it is, and a file or a
        directory the user could not write is one start-up line naming the user.
        """
        import grp
        import pwd

        if os.geteuid() != 0:
            raise self.skipTest("needs root: only root hands files to another user")
        try:
            owner = (pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
        except KeyError:
            raise self.skipTest("needs the user nobody and the group nogroup")
        os.chmod(os.path.dirname(self.directory), 0o755)  # mktemp's private directory: nobody must reach it
        os.chmod(self.directory, 0o755)
        path = os.path.join(self.directory, "var", "stats", "s.jsonl")
        checkStatsPath(path, "cfg.yaml", owner=owner)
        for made in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
            st = os.stat(made)
            self.assertEqual((made, st.st_uid, st.st_gid), (made, *owner))
        checkStatsPath(path, "cfg.yaml", owner=owner)  # existing and writable: fine
        self.assertEqual(os.geteuid(), 0)  # the identity is root's again

        rootOwned = os.path.join(self.directory, "root.jsonl")
        open(rootOwned, "w").close()
        os.chmod(rootOwned, 0o640)
        with self.assertRaises(ConfigError) as e:
            checkStatsPath(rootOwned, "cfg.yaml", "access_log", owner)
        self.assertEqual(str(e.exception), f"cfg.yaml: access_log: cannot write {rootOwned} as nobody: Permission denied")
        self.assertEqual(os.stat(rootOwned).st_uid, 0)

        os.chmod(rootOwned, 0o666)  # writable, but in a directory nobody cannot add files to
        with self.assertRaises(ConfigError) as e:
            checkStatsPath(rootOwned, "cfg.yaml", owner=owner)
        self.assertEqual(str(e.exception), f"cfg.yaml: stats.path: cannot create files in {self.directory} as nobody (needed to rotate)")
        self.assertEqual((os.geteuid(), os.getegid()), (0, 0))

    def test_readOnlyDirectory(self) -> None:
        """A read-only stats directory is refused at start-up (not checkable as root)."""
        if os.geteuid() == 0:
            raise self.skipTest("root ignores directory permissions")
        readonly = os.path.join(self.directory, "ro")
        os.makedirs(readonly)
        os.chmod(readonly, 0o500)
        self.addCleanup(os.chmod, readonly, 0o700)
        with self.assertRaises(ConfigError):
            checkStatsPath(os.path.join(readonly, "s.jsonl"), "cfg.yaml")

    def test_realFullFilesystem(self) -> None:
        """On a real tiny tmpfs: the disk fills, records wait, and all land once there is room."""
        if os.geteuid() != 0:
            raise self.skipTest("mounting a tmpfs needs root")
        mount = os.path.join(self.directory, "tiny")
        os.makedirs(mount)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", mount], capture_output=True).returncode:
            raise self.skipTest("cannot mount a tmpfs here")
        self.addCleanup(subprocess.run, ["umount", "-l", mount], capture_output=True)
        filler = os.path.join(mount, "filler")
        with open(filler, "wb") as f:
            try:
                f.write(b"x" * 200000)
            except OSError:
                pass
        self.path = os.path.join(mount, "stats.jsonl")
        log = UsageLog(self.path, self.clock, runInThread=synchronously)
        log.startService()
        for n in range(50):
            log.write(record(n))
        self.clock.advance(1)
        self.assertEqual(log.pending, 50)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"")  # no partial line
        os.remove(filler)
        self.clock.advance(1)
        self.successResultOf(log.stopService())
        with open(self.path, "rb") as f:
            self.assertEqual([json.loads(line)["request_id"] for line in f], [f"r{n}" for n in range(50)])

    def test_rotationFailureKeepsWriting(self) -> None:
        """A rotation that fails is logged and the records still go to the current file."""
        log = self.writer(maxBytes=len(record(1).toLine()))
        real = jsonl.os.link

        def refuse(a: str, b: str) -> None:
            raise PermissionError(errno.EPERM, "Operation not permitted")

        jsonl.os.link = refuse  # type: ignore[assignment]
        try:
            for n in range(3):
                log.write(record(n))
            self.clock.advance(1)
        finally:
            jsonl.os.link = real  # type: ignore[assignment]
        self.assertEqual([r["request_id"] for r in self.lines()], ["r0", "r1", "r2"])
        self.assertEqual(log.pending, 0)
