"""
The allow-list: a CSV file of keys, held in memory as their SHA-256 digests,
reloaded when the file changes.

A lookup is one hash and one dict access: it never touches the disk. A reload
parses the whole new file and swaps it in with one assignment, so a call sees
the old list or the new one, never a mix. A bad edit keeps the old list and is
logged once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

from lmgate.errors import ConfigError
from lmgate.interfaces import IKeyCheck
from lmgate.records.record import KeyEntry

log = Logger()

REQUIRED = ("id", "api_key", "owner", "added")
HASH_PREFIX = "sha256:"


def digestOf(key: bytes) -> bytes:
    """The digest a key is held under."""
    return hashlib.sha256(key).digest()


def _keyDigest(value: str) -> bytes | None:
    """The digest for an C{api_key} cell: a plain key, or C{sha256:<hex>}. None if malformed."""
    if value.lower().startswith(HASH_PREFIX):
        hexDigest = value[len(HASH_PREFIX) :]
        if len(hexDigest) != 64:
            return None
        try:
            return bytes.fromhex(hexDigest)
        except ValueError:
            return None
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in value):
        return None
    return digestOf(value.encode("ascii"))


def parseAllowList(source: str, content: bytes, problems: list[str] | None = None) -> dict[bytes, KeyEntry]:
    """
    Parse an allow-list file.

    @param source: the file name, for error lines.
    @param problems: when given, every problem is appended to it (as
        C{line N: problem}) instead of raising at the first.
    @return: entries by key digest.
    @raise ConfigError: the first problem (file, line, what), unless C{problems} is given.
    """

    def bad(line: int | None, problem: str) -> None:
        where = f"line {line}" if line is not None else None
        if problems is None:
            raise ConfigError(source, where, problem)
        problems.append(f"{where}: {problem}" if where else problem)

    if not content:
        bad(None, "the file is empty (not even a header): a half-written file?")
        return {}
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bad(None, f"not UTF-8 text (byte {e.start})")
        return {}
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    entries: dict[bytes, KeyEntry] = {}
    keyLines: dict[bytes, int] = {}
    idLines: dict[str, int] = {}
    header: list[str] | None = None
    try:
        for row in reader:
            line = reader.line_num
            cells = [cell.strip() for cell in row]
            if not any(cells):
                continue
            if header is None:
                header = [cell.lower() for cell in cells]
                missing = [name for name in REQUIRED if name not in header]
                if missing:
                    bad(line, f"the header must name {', '.join(REQUIRED)}; missing {', '.join(missing)}")
                    return {}
                if len(set(header)) != len(header):
                    bad(line, "the header names a column twice")
                    return {}
                continue
            if len(cells) != len(header):
                bad(line, f"has {len(cells)} fields, the header has {len(header)}")
                continue
            values = dict(zip(header, cells))
            empty = [name for name in REQUIRED if not values[name]]
            if empty:
                bad(line, f"empty {', '.join(empty)}")
                continue
            digest = _keyDigest(values["api_key"])
            if digest is None:
                bad(line, "api_key must be the key (visible ASCII) or sha256:<64 hex digits>")
                continue
            ident = values["id"]
            if ident in idLines:
                bad(line, f"duplicate id {ident!r} (also on line {idLines[ident]})")
                continue
            if digest in keyLines:
                bad(line, f"duplicate key (also on line {keyLines[digest]})")
                continue
            idLines[ident], keyLines[digest] = line, line
            extra = {name: value for name, value in values.items() if name not in REQUIRED}
            entries[digest] = KeyEntry(ident, values["owner"], values["added"], extra)
    except csv.Error as e:
        bad(reader.line_num, f"not valid CSV: {e}")
        return {}
    if header is None:
        bad(None, "no header line (id,api_key,owner,added)")
    return entries


@implementer(IKeyCheck)
class AllowList(Service):
    """
    The allow-list file, kept in memory and reloaded when it changes.

    @param path: the CSV file.
    @param interval: seconds between checks for a change (inode, mtime, size).
    @param clock: runs the checks.
    @raise ConfigError: the file cannot be loaded at start-up (fail closed).
    """

    def __init__(self, path: FilePath[Any], interval: float, clock: IReactorTime) -> None:
        self._path, self._interval = path, interval
        self._stamp: tuple[int, int, int] | None = None
        self._badStamp: object = None
        self.reloadErrors = 0
        self._entries = self._load()
        self._loop = LoopingCall(self._reloadIfChanged)
        self._loop.clock = clock

    @property
    def size(self) -> int:
        return len(self._entries)

    def lookup(self, key: bytes) -> KeyEntry | None:
        return self._entries.get(hashlib.sha256(key).digest())

    def _statStamp(self) -> tuple[int, int, int]:
        st = os.stat(self._path.path)
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _load(self) -> dict[bytes, KeyEntry]:
        try:
            stamp = self._statStamp()
            with open(self._path.path, "rb") as f:
                content = f.read()
        except OSError as e:
            raise ConfigError(self._path.path, None, f"cannot read: {e.strerror or e}") from None
        self._stamp = stamp  # set first: a bad version is logged once, not every tick
        return parseAllowList(self._path.path, content)

    def startService(self) -> None:
        Service.startService(self)
        self._loop.start(self._interval, now=False)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._loop.running:
            self._loop.stop()

    def _reloadIfChanged(self) -> None:
        try:  # a LoopingCall whose function raises never runs again
            try:
                stamp: object = self._statStamp()
            except FileNotFoundError:
                stamp = "missing"
            if stamp != self._stamp and stamp != self._badStamp:
                self._take()
        except Exception:
            log.failure("Checking the allow-list failed; keeping {count} keys", count=len(self._entries))

    def reload(self) -> bool:
        """
        Load the file now (SIGHUP). Returns whether the new list was taken; on a
        problem the previous list stays and the problem is logged.
        """
        self._badStamp = None
        return self._take()

    def _take(self) -> bool:
        try:
            entries = self._load()
        except ConfigError as e:
            self.reloadErrors += 1
            try:
                self._badStamp = self._statStamp()
            except OSError:
                self._badStamp = "missing"
            log.error(
                "Keeping the previous allow-list ({count} keys): {problem}", count=len(self._entries), problem=str(e)
            )
            return False
        self._badStamp = None
        self._entries = entries
        log.info("Loaded the allow-list {path}: {count} keys", path=self._path.path, count=len(entries))
        return True
