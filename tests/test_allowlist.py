"""The allow-list file: parsing, lookups, and reloading on a fake clock."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from lmgate.access.allowlist import AllowList, parseAllowList
from lmgate.errors import ConfigError

HEADER = b"id,api_key,owner,added\n"


def hashed(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class ParseTests(SynchronousTestCase):
    def problem(self, content: bytes) -> str:
        with self.assertRaises(ConfigError) as e:
            parseAllowList("keys.csv", content)
        return str(e.exception)

    def test_plainAndHashed(self) -> None:
        """Plain and C{sha256:} keys load; extra columns are kept."""
        entries = parseAllowList(
            "f", HEADER[:-1] + b",rpm\na,sk-a,team-a,2026-01-01,10\nb," + hashed("sk-b").encode() + b",team-b,2026-01-02,\n"
        )
        byId = {e.id: e for e in entries.values()}
        self.assertEqual(byId["a"].extra, {"rpm": "10"})
        self.assertEqual(entries[hashlib.sha256(b"sk-b").digest()].owner, "team-b")

    def test_edgeCases(self) -> None:
        """BOM, CRLF, quoted fields, blank lines, spaces around fields and any column order."""
        content = b'\xef\xbb\xbfowner, id ,added,api_key\r\n\r\n"team, a" , a , 2026 ,"sk-a"\r\n  \r\n'
        [entry] = parseAllowList("f", content).values()
        self.assertEqual((entry.id, entry.owner, entry.added), ("a", "team, a", "2026"))

    def test_headerOnlyDeniesEveryone(self) -> None:
        """A header with no rows is valid: every key revoked."""
        self.assertEqual(parseAllowList("f", HEADER), {})

    def test_problems(self) -> None:
        """Each bad file is refused with the file, the line and the problem, never the key."""
        self.assertIn("the file is empty", self.problem(b""))
        self.assertIn("missing owner", self.problem(b"id,api_key,added\n"))
        self.assertIn("line 2: empty owner", self.problem(HEADER + b"a,sk-secret,,2026\n"))
        self.assertIn("line 2: api_key must be", self.problem(HEADER + b"a,sha256:abc,o,2026\n"))
        self.assertIn("line 2: has 3 fields", self.problem(HEADER + b"a,sk-secret,o\n"))
        self.assertIn("not UTF-8", self.problem(HEADER + b"a,sk-\xff,o,2026\n"))
        message = self.problem(HEADER + b"a,sk-secret,o,1\nb,x,o,1\na,y,o,1\n")
        self.assertIn("line 4: duplicate id 'a' (also on line 2)", message)
        message = self.problem(HEADER + b"a,sk-secret,o,1\nb," + hashed("sk-secret").encode() + b",o,1\n")
        self.assertIn("line 3: duplicate key (also on line 2)", message)
        self.assertNotIn("sk-secret", message)

    def test_collectsEveryProblem(self) -> None:
        """With a problems list, every bad line is named."""
        problems: list[str] = []
        parseAllowList("f", HEADER + b"a,,o,1\nb,k,,1\nc,k2,o,1\n", problems)
        self.assertEqual(problems, ["line 2: empty api_key", "line 3: empty owner"])


class ReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = FilePath(self.mktemp())
        self.path.setContent(HEADER + b"a,sk-a,team-a,1\n")
        self.clock = Clock()
        self.allowList = AllowList(self.path, 30, self.clock)
        self.allowList.startService()
        self.addCleanup(self.allowList.stopService)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_level") is not None and e["log_level"].name == "error"]

    def test_lookup(self) -> None:
        """Allowed keys are found with their entry; others are not."""
        entry = self.allowList.lookup(b"sk-a")
        assert entry is not None
        self.assertEqual((entry.id, entry.owner), ("a", "team-a"))
        self.assertIsNone(self.allowList.lookup(b"sk-b"))
        self.assertEqual(self.allowList.size, 1)

    def test_changeTakenAtNextTick(self) -> None:
        """A changed file is swapped in at the next check, not before."""
        self.path.setContent(HEADER + b"b,sk-b,team-b,1\n")
        self.clock.advance(29)
        self.assertIsNotNone(self.allowList.lookup(b"sk-a"))
        self.clock.advance(1)
        self.assertIsNone(self.allowList.lookup(b"sk-a"))
        self.assertIsNotNone(self.allowList.lookup(b"sk-b"))

    def test_badEditKeepsOldListLoggedOnce(self) -> None:
        """A malformed edit keeps the previous list, logged once however many ticks pass."""
        self.path.setContent(HEADER + b"b,,team-b,1\n")
        self.clock.advance(30)
        self.clock.advance(30)
        self.clock.advance(30)
        self.assertIsNotNone(self.allowList.lookup(b"sk-a"))
        self.assertEqual(len(self.errors()), 1)
        self.assertEqual(self.allowList.reloadErrors, 1)
        self.path.setContent(HEADER + b"b,sk-b,team-b,1\n")  # fixed: taken
        self.clock.advance(30)
        self.assertIsNotNone(self.allowList.lookup(b"sk-b"))

    def test_halfWrittenAndEmpty(self) -> None:
        """A zero-byte file (half-written) keeps the previous list."""
        with open(self.path.path, "wb"):
            pass
        self.clock.advance(30)
        self.assertIsNotNone(self.allowList.lookup(b"sk-a"))

    def test_deletedFileKeepsList(self) -> None:
        """A deleted file keeps the previous list, logged once; its return is taken."""
        os.remove(self.path.path)
        self.clock.advance(30)
        self.clock.advance(30)
        self.assertIsNotNone(self.allowList.lookup(b"sk-a"))
        self.assertEqual(len(self.errors()), 1)
        self.path.setContent(HEADER + b"c,sk-c,t,1\n")
        self.clock.advance(30)
        self.assertIsNotNone(self.allowList.lookup(b"sk-c"))

    def test_revokeAll(self) -> None:
        """Header only: everyone is denied."""
        self.path.setContent(HEADER)
        self.clock.advance(30)
        self.assertIsNone(self.allowList.lookup(b"sk-a"))

    def test_forcedReload(self) -> None:
        """reload() (SIGHUP) takes the file now, or says it did not."""
        self.path.setContent(HEADER + b"d,sk-d,t,1\n")
        self.assertTrue(self.allowList.reload())
        self.assertIsNotNone(self.allowList.lookup(b"sk-d"))
        self.path.setContent(b"garbage\n")
        self.assertFalse(self.allowList.reload())
        self.assertIsNotNone(self.allowList.lookup(b"sk-d"))

    def test_failClosedAtStart(self) -> None:
        """A missing or bad file at start-up raises: the daemon does not start."""
        with self.assertRaises(ConfigError):
            AllowList(FilePath(self.mktemp()), 30, self.clock)
        bad = FilePath(self.mktemp())
        bad.setContent(b"")
        with self.assertRaises(ConfigError):
            AllowList(bad, 30, self.clock)
