"""
The audit log through the running daemon: made 0600 at start-up only when a
policy rule asks for audits, a path it cannot write stops it with one line
naming C{audit.path}, and an audited call's line beside its record (reopened
on SIGUSR1).

The call's line needs the policy step (a rule with C{audit: true} marks the
call): that test skips itself while the step is not in the pipeline yet (its
record shows no matched rule).
"""

from __future__ import annotations

import json
import os
import stat

import treq
from twisted.trial.unittest import SkipTest, TestCase

from tests.daemon import Daemon, freePort, readRecords, waitFor

KEY = "sk-audit-e2e-000000000000000AbCd"
CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"the merger plans"}]}'


class DaemonAuditTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.port, self.stubPort = freePort(), freePort()
        self.statsPath = os.path.join(self.directory, "var", "stats.jsonl")
        self.auditPath = os.path.join(self.directory, "var", "audit", "audit.jsonl")
        with open(os.path.join(self.directory, "allowlist.csv"), "w") as f:
            f.write(f"id,api_key,owner,added\nlegal-app,{KEY},legal,2026-12-01\n")

    def config(self, policy: str, auditPath: str | None = None) -> str:
        return (
            f'listen: "tcp:{self.port}:interface=127.0.0.1"\n'
            f"allowlist: {{path: {self.directory}/allowlist.csv}}\n"
            f"stats: {{path: {self.statsPath}, flush_interval: 0.2}}\n"
            f'stub: {{listen: "tcp:{self.stubPort}:interface=127.0.0.1"}}\n'
            f"providers:\n  openai: {{upstream: 'http://127.0.0.1:{self.stubPort}'}}\n"
            f"audit: {{path: {auditPath or self.auditPath}, max_body: 4096}}\n" + policy
        )

    AUDIT_RULE = "policy:\n  rules:\n    - {name: legal-audit, match: {owner: legal}, audit: true, tags: [legal]}\n"

    async def chat(self) -> int:
        response = await treq.post(
            f"http://127.0.0.1:{self.port}/openai/v1/chat/completions", CHAT,
            headers={"Authorization": f"Bearer {KEY}"}, persistent=False,
        )
        await response.content()
        return int(response.code)

    async def test_noAuditRuleNoFile(self) -> None:
        """Rules without C{audit: true} and no plugins: no audit log, not even its directory."""
        daemon = Daemon(self, self.config("policy:\n  rules:\n    - {name: tagged, match: {}, tags: [t]}\n"), self.directory)
        daemon.start()
        await daemon.waitUntilHealthy(self.port)
        self.assertEqual(await self.chat(), 200)
        self.assertFalse(os.path.exists(os.path.dirname(self.auditPath)))
        self.assertEqual(await daemon.stop(), 0)

    async def test_firstAuditRuleOnReloadWaitsForARestart(self) -> None:
        """
        A reload that adds the first C{audit: true} rule says, in its warning,
        that the audit log comes with the next restart; no file appears meanwhile.
        """
        daemon = Daemon(self, self.config(""), self.directory)
        daemon.start()
        await daemon.waitUntilHealthy(self.port)
        with open(daemon.configPath, "w") as f:
            f.write(self.config(self.AUDIT_RULE))
        daemon.signal("HUP")
        await waitFor(lambda: b"Reloaded the configuration" in daemon.watch.output, "the reload")
        self.assertIn(b"audit: true needs the audit log, opened at start-up", daemon.watch.output)
        self.assertEqual(await self.chat(), 200)
        self.assertFalse(os.path.exists(self.auditPath))
        self.assertEqual(await daemon.stop(), 0)

    async def test_unwritablePathStopsWithOneLine(self) -> None:
        """An audit path the daemon cannot write: it does not start, and says which key and why."""
        blocker = os.path.join(self.directory, "not-a-directory")
        with open(blocker, "w"):
            pass
        daemon = Daemon(self, self.config(self.AUDIT_RULE, blocker + "/audit.jsonl"), self.directory)
        daemon.start()
        self.assertNotEqual(await daemon.watch.ended, 0)
        output = daemon.watch.output.decode()
        self.assertIn("audit.path", output)
        self.assertIn("cannot write", output)

    async def test_auditedCallAndReopen(self) -> None:
        """
        An audit rule: the file exists 0600 from start-up; an audited call's
        line carries its record's id and both bodies, no key; after an external
        rename and SIGUSR1 the next line starts a new 0600 file.
        """
        daemon = Daemon(self, self.config(self.AUDIT_RULE), self.directory)
        daemon.start()
        await daemon.waitUntilHealthy(self.port)
        self.assertEqual(stat.S_IMODE(os.stat(self.auditPath).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(self.auditPath)).st_mode) & 0o077, 0)
        self.assertEqual(await self.chat(), 200)
        await waitFor(lambda: readRecords(self.statsPath), "the record")
        [record] = readRecords(self.statsPath)
        if record["policy"] != ["legal-audit"]:
            raise SkipTest("the policy step (audit: true marks the call) is not in the pipeline on this branch")
        self.assertTrue(record["audited"])
        self.assertEqual(record["tags"], ["legal"])

        def lines() -> list[dict[str, object]]:
            with open(self.auditPath, "rb") as f:
                return [json.loads(line) for line in f]

        await waitFor(lines, "the audit line")
        [line] = lines()
        self.assertEqual((line["request_id"], line["owner"], line["policy"]), (record["request_id"], "legal", ["legal-audit"]))
        self.assertEqual(line["request_body"], CHAT.decode())
        self.assertIn("choices", str(line["response_body"]))
        raw = open(self.auditPath, "rb").read()
        self.assertNotIn(KEY.encode(), raw)

        os.rename(self.auditPath, self.auditPath + ".old")
        daemon.signal("USR1")
        await waitFor(lambda: b"Reopening " + self.auditPath.encode() in daemon.watch.output, "the reopen")
        self.assertEqual(await self.chat(), 200)
        await waitFor(lambda: os.path.exists(self.auditPath) and lines(), "a line in the new file")
        self.assertEqual(stat.S_IMODE(os.stat(self.auditPath).st_mode), 0o600)
        self.assertEqual(await daemon.stop(), 0)
