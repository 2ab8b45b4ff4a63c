"""
Import rules of the tree, checked by parsing each module's source (so late
imports inside functions count as much as those at the top).
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import lmgate

PACKAGE = Path(lmgate.__file__).parent
GLOBAL_REACTOR = "twisted.internet.reactor"


def modules(under: Path = PACKAGE) -> dict[str, ast.Module]:
    """Every module of the package by its dotted name, parsed."""
    found = {}
    for path in sorted(under.rglob("*.py")):
        name = ".".join(("lmgate",) + path.relative_to(PACKAGE).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = ast.parse(path.read_text(), str(path))
    return found


def globalReactorUses(tree: ast.Module) -> list[int]:
    """
    The lines of C{tree} that reach Twisted's global reactor: C{from
    twisted.internet import reactor}, C{import twisted.internet.reactor},
    C{from twisted.internet.reactor import ...}, the dotted name
    C{twisted.internet.reactor}, or that name as a string (C{import_module}).
    """
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.module == "twisted.internet" and any(alias.name == "reactor" for alias in node.names):
                lines.append(node.lineno)
            elif node.module == GLOBAL_REACTOR:
                lines.append(node.lineno)
        elif isinstance(node, ast.Import):
            if any(alias.name == GLOBAL_REACTOR for alias in node.names):
                lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "reactor":
            if ast.unparse(node.value) == "twisted.internet":
                lines.append(node.lineno)
        elif isinstance(node, ast.Constant) and node.value == GLOBAL_REACTOR:
            lines.append(node.lineno)
    return sorted(lines)


class GlobalReactorTests(SynchronousTestCase):
    """Only the daemon face takes Twisted's global reactor; every other part is handed one."""

    def test_onlyTheDaemonImportsTheGlobalReactor(self) -> None:
        """No module outside C{lmgate.daemon} reaches the global reactor, at the top or late."""
        offenders = {
            name: lines
            for name, tree in modules().items()
            if not (name == "lmgate.daemon" or name.startswith("lmgate.daemon."))
            for lines in [globalReactorUses(tree)]
            if lines
        }
        self.assertEqual(offenders, {})

    def test_theCheckSeesEveryForm(self) -> None:
        """The check finds each way of writing a global reactor import, also inside a function."""
        source = (
            "from twisted.internet import reactor\n"
            "def f():\n"
            "    from twisted.internet import defer, reactor as r\n"
            "import twisted.internet.reactor\n"
            "from twisted.internet.reactor import callLater\n"
            "x = twisted.internet.reactor\n"
            "importlib.import_module('twisted.internet.reactor')\n"
            "from twisted.internet import task\n"
            "y = self.reactor\n"
        )
        self.assertEqual(globalReactorUses(ast.parse(source)), [1, 3, 4, 5, 6, 7])

    def test_theDaemonIsStillFound(self) -> None:
        """The walk reaches the daemon's modules: the face that does take the global reactor."""
        found = modules()
        self.assertIn("lmgate.daemon.tap", found)
        self.assertTrue(globalReactorUses(found["lmgate.daemon.tap"]))


def importsOf(tree: ast.Module) -> set[str]:
    """
    The dotted names a module imports, at any depth (late imports inside
    functions too): C{import a.b} gives C{a.b}; C{from a.b import c} gives
    C{a.b} and C{a.b.c}.
    """
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def within(name: str, *prefixes: str) -> bool:
    """C{name} is one of C{prefixes} or inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class ImportRuleTests(SynchronousTestCase):
    """The import rules docs/architecture.md states, over every module of the package."""

    def violations(self, owners: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
        """Each import of something in C{forbidden} by a module in C{owners}."""
        return [
            f"{name} imports {imported}"
            for name, tree in modules().items()
            if within(name, *owners)
            for imported in sorted(importsOf(tree))
            if within(imported, *forbidden)
        ]

    def test_theRulesSeeThePackage(self) -> None:
        """Every owner a rule names exists: a rule over no module would pass whatever the tree."""
        found = modules()
        for name in ("lmgate.config", "lmgate.usage.choose", "lmgate.records.jsonl", "lmgate.records.record",
                     "lmgate.stub.server", "lmgate.ops.report", "lmgate.ops.report_html", "lmgate.ops.report_limits"):
            self.assertIn(name, found)

    def test_theCheckSeesLateImports(self) -> None:
        """An import inside a function counts, in both forms."""
        tree = ast.parse("def f():\n    import lmgate.gate.call\n    from lmgate.relay import tee\n")
        self.assertEqual(importsOf(tree), {"lmgate.gate.call", "lmgate.relay", "lmgate.relay.tee"})

    def test_usageReadersAreBytesInCountsOut(self) -> None:
        """Usage readers import nothing of twisted.web, the gate, the relay, the daemon or the writers."""
        self.assertEqual(
            self.violations(
                ("lmgate.usage",),
                ("twisted.web", "lmgate.gate", "lmgate.relay", "lmgate.daemon", "lmgate.records.jsonl", "lmgate.access"),
            ),
            [],
        )

    def test_configImportsNoRuntimeModule(self) -> None:
        """Settings are read and checked without loading any part of the running gateway."""
        self.assertEqual(
            self.violations(
                ("lmgate.config", "lmgate.errors"),
                ("twisted.internet", "twisted.web", "twisted.application", "lmgate.gate", "lmgate.relay",
                 "lmgate.daemon", "lmgate.records", "lmgate.access", "lmgate.usage", "lmgate.ops", "lmgate.stub"),
            ),
            [],
        )

    def test_recordsNeverImportTheGateway(self) -> None:
        """The record, its assembly and the writers stand without the gate, the relay or the daemon."""
        self.assertEqual(self.violations(("lmgate.records",), ("lmgate.gate", "lmgate.relay", "lmgate.daemon")), [])

    def test_stubAndReportNeverImportTheRelay(self) -> None:
        """The stub upstream and the report run without the relay, the gate or the daemon."""
        self.assertEqual(
            self.violations(
                ("lmgate.stub", "lmgate.ops.report", "lmgate.ops.report_html", "lmgate.ops.report_limits"),
                ("lmgate.relay", "lmgate.gate", "lmgate.daemon"),
            ),
            [],
        )
