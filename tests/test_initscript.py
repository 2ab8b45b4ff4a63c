"""
The LSB init script and the systemd unit, run and checked for real.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess

import treq
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.daemon import PROJECT, RACE_RETRIES, TWISTD, freePort, inThread, moveCasePorts, movePort, racedPorts, readRecords

SCRIPT = os.path.join(PROJECT, "etc", "init.d", "lmgate")
UNIT = os.path.join(PROJECT, "etc", "systemd", "lmgate.service")
KEY = "sk-initscript-0000000000000000"


class InitScriptTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.port, self.stubPort = freePort(), freePort()
        with open(os.path.join(self.dir, "allowlist.csv"), "w") as f:
            f.write(f"id,api_key,owner,added\nci,{KEY},ops,2026-11-23\n")
        self.stats = os.path.join(self.dir, "var", "stats.jsonl")
        with open(os.path.join(self.dir, "lmgate.yaml"), "w") as f:
            f.write(f"""listen: "tcp:{self.port}:interface=127.0.0.1"
allowlist: {{path: {self.dir}/allowlist.csv}}
stats: {{path: {self.stats}, flush_interval: 0.2}}
stub: {{listen: "tcp:{self.stubPort}:interface=127.0.0.1"}}
providers:
  openai: {{upstream: "http://127.0.0.1:{self.stubPort}"}}
""")
        self.pidfile = os.path.join(self.dir, "run", "lmgate.pid")
        defaults = os.path.join(self.dir, "default-lmgate")
        with open(defaults, "w") as f:
            f.write(f"TWISTD={TWISTD}\nRUNDIR={self.dir}\nCONFIG={self.dir}/lmgate.yaml\nPIDFILE={self.pidfile}\n"
                    f"LOGFILE={self.dir}/log/lmgate.log\nUSER=\nGROUP=\nSTOP_TIMEOUT=30\n")
        self.env = dict(os.environ, LMGATE_DEFAULTS=defaults, PYTHONPATH=PROJECT)
        self.addCleanup(self.killLeftover)

    def killLeftover(self) -> None:
        if os.path.exists(self.pidfile):
            with open(self.pidfile) as f:
                pid = int(f.read().strip() or 0)
            if pid:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass

    def script(self, action: str) -> "Deferred[subprocess.CompletedProcess[str]]":
        return inThread(subprocess.run, ["sh", SCRIPT, action], env=self.env, capture_output=True, text=True, timeout=90)

    async def start(self) -> "subprocess.CompletedProcess[str]":
        """
        The script's C{start}. One that failed because a port from C{freePort}
        was taken by another process since (a lost bind race, not a fault) is
        repeated with that port moved to a fresh one, a bounded number of times.
        """
        configPath = os.path.join(self.dir, "lmgate.yaml")
        for _ in range(RACE_RETRIES):
            result = await self.script("start")
            taken = racedPorts((result.stdout + result.stderr).encode())
            if result.returncode == 0 or not taken:
                return result
            with open(configPath) as f:
                config = f.read()
            for old in taken:
                new = freePort()
                config = movePort(config, old, new)
                moveCasePorts(self, old, new)
            with open(configPath, "w") as f:
                f.write(config)
        return await self.script("start")

    async def test_lifecycle(self) -> None:
        """start → /healthz 200 → a proxied call → reload → status 0 → stop → no process,
        no pid file, every record on disk; status 3 afterwards."""
        result = await self.start()
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        with open(self.pidfile) as f:
            pid = int(f.read())
        response = await treq.get(f"http://127.0.0.1:{self.port}/healthz", persistent=False)
        self.assertEqual((response.code, await response.content()), (200, b"ok"))
        response = await treq.post(f"http://127.0.0.1:{self.port}/openai/v1/chat/completions",
                                   b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}',
                                   headers={"Authorization": f"Bearer {KEY}"}, persistent=False)
        self.assertEqual(response.code, 200)
        await response.content()
        self.assertEqual((await self.script("reload")).returncode, 0)
        self.assertEqual((await self.script("status")).returncode, 0)
        self.assertEqual((await self.script("start")).returncode, 0)  # already running: fine
        result = await self.script("stop")
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertFalse(os.path.exists(self.pidfile))
        self.assertFalse(os.path.exists(f"/proc/{pid}"))
        [record] = readRecords(self.stats)
        self.assertEqual((record["status"], record["lmgate_id"]), (200, "ci"))
        self.assertEqual((await self.script("status")).returncode, 3)
        self.assertEqual((await self.script("stop")).returncode, 0)  # not running: still 0
        with open(os.path.join(self.dir, "log", "lmgate.log")) as f:
            self.assertIn("Received SIGHUP", f.read())

    async def test_stalePidFile(self) -> None:
        """A pid file naming a dead process: status 1, and start still works."""
        os.makedirs(os.path.dirname(self.pidfile))
        with open(self.pidfile, "w") as f:
            f.write("999999\n")
        self.assertEqual((await self.script("status")).returncode, 1)
        self.assertEqual((await self.start()).returncode, 0)
        self.assertEqual((await self.script("stop")).returncode, 0)

    async def test_badConfigurationFailsStart(self) -> None:
        """A bad configuration makes start fail with twistd's one-line error."""
        with open(os.path.join(self.dir, "lmgate.yaml"), "a") as f:
            f.write("timeouts: {connect: never}\n")
        result = await self.script("start")
        self.assertEqual(result.returncode, 1)
        self.assertIn("timeouts.connect: must be a number > 0", result.stdout + result.stderr)


    async def call(self) -> int:
        response = await treq.post(f"http://127.0.0.1:{self.port}/openai/v1/chat/completions",
                                   b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}',
                                   headers={"Authorization": f"Bearer {KEY}"}, persistent=False)
        await response.content()
        return int(response.code)

    async def test_serviceUserOwnsItsFiles(self) -> None:
        """
        Started by root with USER=nobody GROUP=nogroup: the record and access-log
        files and the directories created for them belong to nobody, every call's
        record is on disk after stop, and nothing was held in memory.
        """
        import grp
        import pwd

        if os.geteuid() != 0:
            raise self.skipTest("needs root: the init script only switches users when started by root")
        try:
            nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
        except KeyError:
            raise self.skipTest("needs the user nobody and the group nogroup")
        os.chmod(os.path.dirname(self.dir), 0o755)  # mktemp's private directory: nobody must reach the files
        self.stats = os.path.join(self.dir, "var", "stats", "stats.jsonl")
        with open(os.path.join(self.dir, "lmgate.yaml")) as f:
            config = f.read().replace(f"{self.dir}/var/stats.jsonl", self.stats)
        with open(os.path.join(self.dir, "lmgate.yaml"), "w") as f:
            f.write(config)
        with open(self.env["LMGATE_DEFAULTS"], "a") as f:
            f.write("USER=nobody\nGROUP=nogroup\n")
        result = await self.start()
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        codes = [await self.call() for _ in range(5)]
        self.assertEqual(codes, [200] * 5)
        with open(self.pidfile) as f:
            pid = int(f.read())
        self.assertEqual(os.stat(f"/proc/{pid}").st_uid, nobody)
        result = await self.script("stop")
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "lmgate stopped"), result.stdout + result.stderr)
        self.assertEqual([r["status"] for r in readRecords(self.stats)], [200] * 5)
        access = os.path.join(self.dir, "var", "stats", "access.log")
        with open(access, "rb") as f:
            self.assertEqual(len(f.read().splitlines()), 5)
        for path in (self.stats, access, os.path.join(self.dir, "var", "stats"), os.path.join(self.dir, "var")):
            st = os.stat(path)
            self.assertEqual((path, st.st_uid, st.st_gid), (path, nobody, nogroup))
        with open(os.path.join(self.dir, "log", "lmgate.log")) as f:
            log = f.read()
        self.assertNotIn("Cannot write", log)
        self.assertNotIn("they are lost", log)

    async def test_lostRecordsFailTheStop(self) -> None:
        """Records the daemon could not write by the end of the stop make stop fail and say so."""
        result = await self.start()
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        os.unlink(self.stats)
        os.mkdir(self.stats)  # nothing can be appended to it now
        self.assertEqual(await self.call(), 200)
        result = await self.script("stop")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("lmgate stopped, but lost records", result.stdout)
        self.assertIn("1 usage records could not be written before stopping; they are lost", result.stdout)
        self.assertFalse(os.path.exists(self.pidfile))

    async def test_portInUseIsOneLine(self) -> None:
        """A listening port already taken fails the start with one line naming the endpoint."""
        import socket

        with socket.socket() as holder:
            holder.bind(("127.0.0.1", self.port))
            holder.listen(1)
            result = await self.script("start")
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        self.assertIn(f"listen: cannot listen on tcp:{self.port}:interface=127.0.0.1: address already in use\n", output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("An error has occurred", output)
        self.assertFalse(os.path.exists(self.pidfile))


class SystemdUnitTests(TestCase):
    def test_unitSettings(self) -> None:
        """The unit runs twistd in the foreground, reloads with SIGHUP, outwaits the drain, and is sandboxed."""
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(UNIT)
        service = parser["Service"]
        self.assertIn("twistd -n --pidfile= lmgate --config", service["ExecStart"])
        self.assertEqual(service["ExecReload"], "/bin/kill -HUP $MAINPID")
        self.assertGreater(int(service["TimeoutStopSec"]), 30)
        for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("User", "lmgate")]:
            self.assertEqual(service[key], value)
        self.assertIn("/var/lib/lmgate", service["ReadWritePaths"])
        self.assertIn("SERVICE_RESULT", service["ExecStopPost"])  # a failed stop (records lost) is said in the journal

    def test_systemdAnalyzeVerify(self) -> None:
        """systemd-analyze verify accepts the units, where it is available."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise self.skipTest("systemd-analyze is not installed here")
        result = subprocess.run([analyze, "verify", UNIT, UNIT.replace(".service", ".socket")], capture_output=True, text=True, timeout=60)
        problems = [line for line in result.stderr.splitlines() if "lmgate" in line and "Command" not in line]
        self.assertEqual(problems, [], result.stderr)
