"""The C{lmgate keys} commands."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from lmgate.access.allowlist import parseAllowList
from lmgate.access.keys import main


class Input(io.StringIO):
    def isatty(self) -> bool:
        return False


class KeysTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = FilePath(self.mktemp())

    def run_(self, *argv: str, stdin: str = "") -> tuple[int, str]:
        out = io.StringIO()
        return main(list(argv), Input(stdin), out), out.getvalue()

    def test_hash(self) -> None:
        """C{keys hash} prints the sha256: form of the key on stdin."""
        code, out = self.run_("hash", stdin="sk-abc\n")
        self.assertEqual((code, out), (0, "sha256:" + hashlib.sha256(b"sk-abc").hexdigest() + "\n"))

    def test_addHashedByDefault(self) -> None:
        """C{keys add} creates the file, stores the hash, and the result parses."""
        code, out = self.run_("add", "--id", "ci", "--owner", "team", "--file", self.path.path, "--added", "2026-11-23", stdin="sk-secret-1\n")
        self.assertEqual(code, 0)
        content = self.path.getContent()
        self.assertNotIn(b"sk-secret-1", content)
        self.assertNotIn("sk-secret-1", out)
        [entry] = parseAllowList("f", content).values()
        self.assertEqual((entry.id, entry.owner, entry.added), ("ci", "team", "2026-11-23"))

    def test_addPlainKeepsRowsAndMode(self) -> None:
        """C{--plain} stores the key itself; existing rows, extra columns and the file mode stay."""
        self.path.setContent(b"id,api_key,owner,added,rpm\nold,sk-old,t,1,5\n")
        os.chmod(self.path.path, 0o600)
        self.run_("add", "--id", "new", "--owner", "t2", "--plain", "--key", "sk-new", "--file", self.path.path)
        content = self.path.getContent().decode()
        self.assertIn("old,sk-old,t,1,5", content)
        self.assertIn("new,sk-new,t2,", content)
        self.assertEqual(os.stat(self.path.path).st_mode & 0o777, 0o600)

    def test_duplicatesRefused(self) -> None:
        """A duplicate id or key is refused and the file is unchanged."""
        self.run_("add", "--id", "a", "--owner", "t", "--key", "sk-1", "--file", self.path.path)
        before = self.path.getContent()
        with self.assertRaises(SystemExit):
            self.run_("add", "--id", "a", "--owner", "t", "--key", "sk-2", "--file", self.path.path)
        with self.assertRaises(SystemExit):
            self.run_("add", "--id", "b", "--owner", "t", "--key", "sk-1", "--plain", "--file", self.path.path)
        self.assertEqual(self.path.getContent(), before)

    def test_listMasks(self) -> None:
        """C{keys list} shows ids, owners, dates and masked keys only."""
        self.path.setContent(b"id,api_key,owner,added\na,sk-plainkey-123456,t,1\nb," + b"sha256:" + b"0" * 64 + b",u,2\n")
        code, out = self.run_("list", "--file", self.path.path)
        self.assertEqual(code, 0)
        self.assertIn("sk-p…3456", out)
        self.assertIn("sha256:00000000…", out)
        self.assertNotIn("sk-plainkey-123456", out)

    def test_remove(self) -> None:
        """C{keys remove} drops one id atomically."""
        self.path.setContent(b"id,api_key,owner,added\na,k1,t,1\nb,k2,t,1\n")
        self.run_("remove", "--id", "a", "--file", self.path.path)
        self.assertEqual([e.id for e in parseAllowList("f", self.path.getContent()).values()], ["b"])

    def test_checkNamesEveryBadLine(self) -> None:
        """C{keys check} exits non-zero naming each bad line."""
        self.path.setContent(b"id,api_key,owner,added\na,,t,1\nb,k,,1\nc,k3,t,1\n")
        result = subprocess.run(
            [sys.executable, "-m", "lmgate.cli", "keys", "check", self.path.path],
            capture_output=True, text=True, timeout=60,
            env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        )
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr.splitlines(),
            [f"{self.path.path}: line 2: empty api_key", f"{self.path.path}: line 3: empty owner"],
        )
        self.path.setContent(b"id,api_key,owner,added\nc,k3,t,1\n")
        code, out = self.run_("check", self.path.path)
        self.assertEqual(code, 0)

    def test_checkTakesTheFileEitherWay(self) -> None:
        """C{keys check} takes the file as a positional or as C{--file} like the other subcommands;
        two different files are refused."""
        self.path.setContent(b"id,api_key,owner,added\nc,k3,t,1\n")
        expected = (0, f"{self.path.path}: 1 keys, no problems\n")
        self.assertEqual(self.run_("check", self.path.path), expected)
        self.assertEqual(self.run_("check", "--file", self.path.path), expected)
        self.assertEqual(self.run_("check", self.path.path, "--file", self.path.path), expected)
        with self.assertRaises(SystemExit):
            self.run_("check", self.path.path, "--file", self.path.path + ".other")
