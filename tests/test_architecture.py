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
