"""
Start-up errors: each becomes one line on stderr and a non-zero exit.
"""

from __future__ import annotations


class ConfigError(Exception):
    """
    Something LMGate was given cannot be used.

    Its text is the one line an operator sees: the file, the key (or line) and
    what is wrong, e.g. C{etc/lmgate.yaml: timeouts.connect: must be a number > 0}.
    """

    def __init__(self, source: str, where: str | None, problem: str) -> None:
        self.source, self.where, self.problem = source, where, problem
        text = f"{source}: {where}: {problem}" if where else f"{source}: {problem}"
        super().__init__(text)
