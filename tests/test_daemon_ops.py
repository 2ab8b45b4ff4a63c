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

from tests.daemon import PROJECT, Daemon, freePort, movePort, racedPorts, readRecords, waitFor

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


def exchange(port: int, data: bytes) -> bytes:
    """Send C{data} on a new connection to 127.0.0.1:C{port}; everything received until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        received = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return received
            received += chunk


def head(response: bytes) -> tuple[int, dict[bytes, bytes]]:
    """The status and the (lower-cased) headers of a raw HTTP/1.1 response."""
    lines = response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    headers = dict(line.split(b":", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.strip().lower(): v.strip() for k, v in headers.items()}


class AdminPortTests(OpsTestCase):
    async def test_adminPortServesOnlyItsPagesTakesNoBodyAndShowsNoBanner(self) -> None:
        """
        The admin port answers exactly /metrics and /healthz (404 for anything
        else, sub-paths included), refuses a request body with 413 as soon as
        the headers are in (no 100 Continue, the body never sent), and neither
        it nor the gateway port's own answers carry a TwistedWeb Server banner;
        a relayed response keeps the upstream's own Server header.
        """
        from tests.daemon import inThread

        self.admin = freePort()  # an attribute: a start that loses a bind race moves it
        daemon = Daemon(self, self.config(f'admin: {{listen: "tcp:{self.admin}:interface=127.0.0.1"}}\n'), self.directory)
        daemon.start()
        await daemon.waitUntilHealthy(self.port)

        def get(port: int, path: bytes, method: bytes = b"GET", extra: bytes = b"") -> tuple[int, dict[bytes, bytes], bytes]:
            raw = exchange(port, method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + extra + b"\r\n")
            status, headers = head(raw)
            return status, headers, raw

        def probe() -> dict[str, object]:
            seen: dict[str, object] = {}
            for path in (b"/metrics", b"/metrics?x=1", b"/healthz", b"/", b"/metrics/x", b"/healthz/x", b"/metrics/",
                         b"/nothing", b"//metrics"):
                status, headers, _ = get(self.admin, path)
                seen[path.decode()] = (status, headers.get(b"server"))
            seen["POST /metrics"] = get(self.admin, b"/metrics", b"POST", b"Content-Length: 0\r\n")[:2][0]
            # A body announced: refused at once, before it is sent (the socket would hang otherwise).
            status, headers, raw = get(self.admin, b"/metrics", b"POST", b"Content-Length: 33554432\r\nExpect: 100-continue\r\n")
            seen["large body"] = (status, b"100 Continue" in raw, headers.get(b"server"))
            status, headers, raw = get(self.admin, b"/metrics", b"POST", b"Transfer-Encoding: chunked\r\n")
            seen["chunked body"] = (status, headers.get(b"server"))
            for path, extra in [(b"/healthz", b""), (b"/openai/v1/models", b""), (b"/nowhere/v1", b""),
                                (b"/openai/v1/chat/completions", b"Authorization: Bearer " + KEY.encode() + b"\r\n")]:
                status, headers, _ = get(self.port, path, b"GET", extra)
                seen["gateway " + path.decode()] = (status, headers.get(b"server"))
            return seen

        seen = await inThread(probe)
        await daemon.stop()
        relayed = seen.pop("gateway /openai/v1/chat/completions")
        self.assertEqual(seen, {
            "/metrics": (200, None),
            "/metrics?x=1": (200, None),
            "/healthz": (200, None),
            "/": (404, None),
            "/metrics/x": (404, None),
            "/healthz/x": (404, None),
            "/metrics/": (404, None),
            "/nothing": (404, None),
            "//metrics": (404, None),
            "POST /metrics": 405,
            "large body": (413, False, None),
            "chunked body": (413, None),
            "gateway /healthz": (200, None),
            "gateway /openai/v1/models": (403, None),
            "gateway /nowhere/v1": (404, None),
        })
        # The stub upstream is a twisted.web site of its own: its banner is the upstream's, relayed as it came.
        self.assertTrue(str(relayed[1]).startswith("b'TwistedWeb/"), relayed)


class PortInUseTests(OpsTestCase):
    """A port already taken stops the start with one line naming the endpoint: no traceback."""

    def takePort(self) -> int:
        """A loopback port held by a listening socket until the test ends."""
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        self.addCleanup(holder.close)
        return int(holder.getsockname()[1])

    async def assertStopsWithOneLine(self, key: str, port: int, *extra: str, config: str = "") -> None:
        daemon = Daemon(self, self.config(config), self.directory)
        daemon.start(*extra)
        code = await daemon.watch.ended
        while daemon.restartIfRaced():  # a port from freePort lost to another process, not the one taken here
            code = await daemon.watch.ended
        output = daemon.watch.output.decode()
        self.assertNotEqual(code, 0, output)
        self.assertNotIn("Traceback", output)
        self.assertEqual(
            output.strip().splitlines(),
            [f"lmgate: {daemon.configPath}: {key}: cannot listen on tcp:{port}:interface=127.0.0.1: address already in use"],
        )

    async def test_listen(self) -> None:
        """The main listener's port taken."""
        self.port = self.takePort()
        await self.assertStopsWithOneLine("listen", self.port)

    async def test_listenWithWorkers(self) -> None:
        """The shared port of --workers taken."""
        self.port = self.takePort()
        await self.assertStopsWithOneLine("listen", self.port, "--workers", "2")

    async def test_stub(self) -> None:
        """The in-process stub upstream's port taken."""
        self.stubPort = self.takePort()
        await self.assertStopsWithOneLine("stub.listen", self.stubPort)

    async def test_stubWithWorkers(self) -> None:
        """The stub's port taken, the supervisor serving it."""
        self.stubPort = self.takePort()
        await self.assertStopsWithOneLine("stub.listen", self.stubPort, "--workers", "2")

    async def test_admin(self) -> None:
        """The admin listener's port taken."""
        admin = self.takePort()
        await self.assertStopsWithOneLine("admin.listen", admin, config=f'admin: {{listen: "tcp:{admin}:interface=127.0.0.1"}}\n')


class WorkersCheckFirstTests(OpsTestCase):
    """With --workers, what a worker would fail on stops the start in the foreground, with one line:
    a worker that cannot start would be restarted for ever while the shared socket accepted calls."""

    async def assertStopsWithLine(self, line: str, config: str) -> None:
        daemon = Daemon(self, self.config(config), self.directory)
        daemon.start("--workers", "2")
        code = await daemon.watch.ended
        output = daemon.watch.output.decode()
        self.assertNotEqual(code, 0, output)
        self.assertEqual(output.strip().splitlines(), [line])

    async def test_badPriceTable(self) -> None:
        prices = os.path.join(self.directory, "prices.yaml")
        with open(prices, "w") as f:
            f.write("gpt-4o-mini: {input: 0.15, output: 0.60}\n")
        await self.assertStopsWithLine(f"lmgate: {prices}: models: must be a mapping of model id to prices", f"prices: {{path: {prices}}}\n")

    async def test_badCABundle(self) -> None:
        bundle = os.path.join(self.directory, "ca.pem")
        with open(bundle, "w") as f:
            f.write("not a certificate\n")
        daemon = Daemon(self, self.config(f"tls: {{ca_bundle: {bundle}}}\n"), self.directory)
        daemon.start("--workers", "2")
        code = await daemon.watch.ended
        output = daemon.watch.output.decode().strip().splitlines()
        self.assertNotEqual(code, 0)
        self.assertEqual(len(output), 1, output)
        self.assertIn("tls.ca_bundle: cannot load", output[0])


class BindRaceTests(OpsTestCase):
    """A port chosen by freePort and taken by another process before the daemon binds it
    (tests run in parallel) is a lost race, not a failure: the start is repeated on a fresh port."""

    async def test_lostRaceStartsAgainOnAFreshPort(self) -> None:
        """The daemon's port taken right after its choice: the helper starts the daemon
        again with the port moved, in its config and in C{self.port}; it serves there."""
        taken = self.port
        holder = socket.socket()
        holder.bind(("127.0.0.1", taken))  # bound, not listening: the daemon's bind fails, a probe is refused
        self.addCleanup(holder.close)
        daemon = Daemon(self, self.config(), self.directory)
        daemon.start()
        await daemon.waitUntilHealthy(self.port)
        self.assertNotEqual(self.port, taken)
        self.assertEqual(daemon.moved, {taken: self.port})
        with open(daemon.configPath) as f:
            self.assertIn(f'listen: "tcp:{self.port}:interface=127.0.0.1"', f.read())
        self.assertEqual(await self.chat(), 200)
        self.assertEqual(await daemon.stop(), 0)

    def test_racedPortsAreOnlyChosenOnes(self) -> None:
        """Only ports handed out by freePort, named in an "address already in use" line, count as a lost race."""
        chosen = freePort()
        line = f"lmgate: x.yaml: admin.listen: cannot listen on tcp:{chosen}:interface=127.0.0.1: address already in use"
        self.assertEqual(racedPorts(line.encode()), {chosen})
        twisted = f"Couldn't listen on 127.0.0.1:{chosen}: [Errno 98] Address already in use."
        self.assertEqual(racedPorts(twisted.encode()), {chosen})
        self.assertEqual(racedPorts(line.replace("address already in use", "permission denied").encode()), set())
        self.assertEqual(racedPorts(line.replace(str(chosen), "1").encode()), set())

    def test_movePort(self) -> None:
        """Every C{:PORT} becomes the new port; a longer number that starts the same does not."""
        self.assertEqual(
            movePort('listen: "tcp:4000:interface=127.0.0.1"\nup: http://127.0.0.1:4000/\nother: tcp:40001\n', 4000, 5000),
            'listen: "tcp:5000:interface=127.0.0.1"\nup: http://127.0.0.1:5000/\nother: tcp:40001\n',
        )


class ListenerTests(SynchronousTestCase):
    def test_failureAfterTheCheckIsOneLine(self) -> None:
        """
        A listen that fails when the service starts (the port taken after the
        foreground check, or an endpoint that cannot be checked) is a
        C{SystemExit} with one line naming the endpoint, not a traceback.
        """
        import errno

        from twisted.internet.defer import fail
        from twisted.internet.error import CannotListenError

        from lmgate.daemon.listen import Listener

        class Taken:
            def listen(self, factory: object) -> object:
                return fail(CannotListenError("127.0.0.1", 8080, OSError(errno.EADDRINUSE, "Address already in use")))

        listener = Listener(Taken(), object(), "tcp:8080:interface=127.0.0.1")
        with self.assertRaises(SystemExit) as e:
            listener.privilegedStartService()
        self.assertEqual(str(e.exception), "lmgate: cannot listen on tcp:8080:interface=127.0.0.1: address already in use")


class LostRecordsTests(OpsTestCase):
    """Records that cannot be written by the end of the stop make the daemon exit non-zero."""

    def breakStatsFile(self, path: str) -> None:
        os.unlink(path)
        os.mkdir(path)  # nothing can be appended to it, even by root

    async def test_exitStatus(self) -> None:
        """A record the daemon cannot write by the end of the stop: logged as lost, exit 1."""
        daemon = Daemon(self, self.config(), self.directory)
        daemon.start()
        await daemon.waitUntilHealthy(self.port)
        self.breakStatsFile(self.statsPath)
        self.assertEqual(await self.chat(), 200)
        code = await daemon.stop()
        output = daemon.watch.output.decode()
        self.assertIn("1 usage records could not be written before stopping; they are lost", output)
        self.assertEqual(code, 1, output)

    async def test_exitStatusWithWorkers(self) -> None:
        """A worker that lost records exits non-zero, and so does its supervisor."""
        daemon = Daemon(self, self.config(), self.directory)
        daemon.start("--workers", "2")
        await daemon.waitUntilHealthy(self.port)
        paths = [os.path.join(self.directory, "var", f"stats-w{index}.jsonl") for index in (1, 2)]
        # Healthy means one worker listens: the other may still be opening its file.
        await waitFor(lambda: all(os.path.exists(path) for path in paths), "both workers' stats files")
        for path in paths:
            self.breakStatsFile(path)
        self.assertEqual(await self.chat(), 200)
        code = await daemon.stop()
        output = daemon.watch.output.decode()
        self.assertIn("usage records could not be written before stopping; they are lost", output)
        self.assertIn("stopped with exit 1", output)
        self.assertEqual(code, 1, output)

    async def test_cleanStopExitsZero(self) -> None:
        """Every record written: exit 0."""
        daemon = Daemon(self, self.config(), self.directory)
        daemon.start()
        await daemon.waitUntilHealthy(self.port)
        self.assertEqual(await self.chat(), 200)
        self.assertEqual(await daemon.stop(), 0)
        self.assertEqual(len(readRecords(self.statsPath)), 1)
