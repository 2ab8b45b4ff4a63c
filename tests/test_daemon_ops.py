"""
End to end, as an operator meets the daemon: its environment, the embedded
demo from any directory, ports already taken, the admin port, and the exit
status when records are lost.
"""

from __future__ import annotations

import os
import socket

import treq
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.daemon import PROJECT, Daemon, freePort, readRecords

KEY = "sk-ops-e2e-0000000000000000AbCd"
CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'

#: What Kubernetes puts into every pod when a Service named C{lmgate} exists.
KUBERNETES_SERVICE = {
    "LMGATE_PORT": "tcp://10.0.0.1:8080",
    "LMGATE_PORT_8080_TCP": "tcp://10.0.0.1:8080",
    "LMGATE_PORT_8080_TCP_ADDR": "10.0.0.1",
    "LMGATE_PORT_8080_TCP_PORT": "8080",
    "LMGATE_PORT_8080_TCP_PROTO": "tcp",
    "LMGATE_SERVICE_HOST": "10.0.0.1",
    "LMGATE_SERVICE_PORT": "8080",
}


class OpsTestCase(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.port, self.stubPort = freePort(), freePort()
        self.statsPath = os.path.join(self.directory, "var", "stats.jsonl")
        with open(os.path.join(self.directory, "allowlist.csv"), "w") as f:
            f.write(f"id,api_key,owner,added\nops,{KEY},ops,2026-11-23\n")

    def config(self, extra: str = "") -> str:
        return (
            f'listen: "tcp:{self.port}:interface=127.0.0.1"\n'
            f"allowlist: {{path: {self.directory}/allowlist.csv}}\n"
            f"stats: {{path: {self.statsPath}, flush_interval: 0.2}}\n"
            f'stub: {{listen: "tcp:{self.stubPort}:interface=127.0.0.1"}}\n'
            f"providers:\n  openai: {{upstream: 'http://127.0.0.1:{self.stubPort}'}}\n" + extra
        )

    async def chat(self, port: int | None = None) -> int:
        response = await treq.post(
            f"http://127.0.0.1:{port or self.port}/openai/v1/chat/completions", CHAT,
            headers={"Authorization": f"Bearer {KEY}"}, persistent=False,
        )
        await response.content()
        return int(response.code)


class EnvironmentTests(OpsTestCase):
    async def test_kubernetesServiceVariablesAreIgnored(self) -> None:
        """
        The variables a Kubernetes Service named C{lmgate} injects do not stop
        the start: the daemon serves, and names them in one warning line.
        """
        daemon = Daemon(self, self.config(), self.directory, env=KUBERNETES_SERVICE)
        daemon.start()
        await daemon.waitUntilHealthy(self.port)
        self.assertEqual(await self.chat(), 200)
        self.assertEqual(await daemon.stop(), 0)
        output = daemon.watch.output.decode()
        warnings = [line for line in output.splitlines() if "name no configuration key" in line]
        self.assertEqual(len(warnings), 1, output)
        for name in KUBERNETES_SERVICE:
            self.assertIn(name, warnings[0])
        self.assertNotIn("10.0.0.1", warnings[0])  # names, not values

    async def test_wrongValueForARealKeyStillStops(self) -> None:
        """A wrong value for a real key stops the start with one line naming the variable."""
        daemon = Daemon(self, self.config(), self.directory,
                        env=dict(KUBERNETES_SERVICE, LMGATE_TIMEOUTS__RESPONSE="soon"))
        daemon.start()
        self.assertNotEqual(await daemon.watch.ended, 0)
        self.assertIn(b"LMGATE_TIMEOUTS__RESPONSE (environment): timeouts.response: must be a number > 0",
                      daemon.watch.output)


class DemoTests(OpsTestCase):
    async def test_demoFromAnotherDirectoryPricesItsCalls(self) -> None:
        """
        The embedded demo started in a directory that has no etc/ (a fresh temp
        directory) uses its packaged price table: the record has a cost.
        """
        env = {
            "LMGATE_STUB__LISTEN": f"tcp:{self.stubPort}:interface=127.0.0.1",
            "LMGATE_PROVIDERS__OPENAI__UPSTREAM": f"http://127.0.0.1:{self.stubPort}",
        }
        daemon = Daemon(self, "", self.directory, env=env)
        self.assertFalse(os.path.exists(os.path.join(self.directory, "etc")))
        response = None
        daemon.startDemo("--listen", f"tcp:{self.port}:interface=127.0.0.1")
        await daemon.waitUntilHealthy(self.port)
        response = await treq.post(
            f"http://127.0.0.1:{self.port}/openai/v1/chat/completions", CHAT,
            headers={"Authorization": "Bearer lmgate-demo-key"}, persistent=False,
        )
        await response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(await daemon.stop(), 0)
        self.assertNotIn(b"No price table", daemon.watch.output)
        [record] = readRecords(os.path.join(self.directory, "var", "stats", "stats.jsonl"))
        self.assertEqual((record["status"], record["model"]), (200, "gpt-4o-mini"))
        self.assertIsNotNone(record["cost_usd"])
        self.assertGreater(record["cost_usd"], 0)


class PackagedPricesTests(SynchronousTestCase):
    def test_demoPricesAreTheEditableTable(self) -> None:
        """The demo's packaged price table is etc/prices.yaml, byte for byte: the two never drift."""
        with open(os.path.join(PROJECT, "etc", "prices.yaml"), "rb") as f:
            editable = f.read()
        with open(os.path.join(PROJECT, "lmgate", "demo", "prices.yaml"), "rb") as f:
            packaged = f.read()
        self.assertEqual(packaged, editable, "copy etc/prices.yaml to lmgate/demo/prices.yaml")
