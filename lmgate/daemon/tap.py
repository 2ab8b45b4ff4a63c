"""
The daemon's entry points: C{twistd -n lmgate [--config PATH] [--listen
ENDPOINT]} comes here through the plugin (L{makeService}); C{twistd -ny
lmgate.tac} through L{serviceFor}. This is the face: the one place that takes
Twisted's global reactor and hands it to everything it builds. Everything that
can be wrong with the configuration, the allow-list or the stats directory is
found here, in the foreground, and becomes one line and a non-zero exit.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from lmgate.daemon.assemble import buildService, supervisorService
from lmgate.daemon.options import Options, ownerFor, settingsFor, warnIgnoredEnvironment
from lmgate.daemon.services import exitNonZeroOnLoss
from lmgate.errors import ConfigError

__all__ = ["Options", "makeService", "serviceFor"]


def serviceFor(
    configPath: str | None,
    listen: str | None = None,
    reactor: Any = None,
    workers: int = 1,
    workerFd: int | None = None,
    workerIndex: int | None = None,
    owner: tuple[int, int] | None = None,
) -> IService:
    """
    Settings and service tree in one step, with start-up errors as C{SystemExit}
    carrying one line (twistd prints it and exits non-zero).
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    try:
        settings = settingsFor(configPath, listen)
        if workerFd is None:  # once: a worker has its supervisor's environment
            warnIgnoredEnvironment()
        if workers > 1 and workerFd is None:
            return supervisorService(settings, reactor, configPath, listen, workers, owner)
        return buildService(settings, reactor, listen, workerFd, workerIndex, owner)
    except ConfigError as e:
        raise SystemExit(f"lmgate: {e}") from None


#: Modules of the command-line tools, which the daemon never imports.
_NOT_PRELOADED = frozenset({"lmgate.cli", "lmgate.access.keys", "lmgate.ops.report", "lmgate.ops.report_html"})


def preloadModules() -> None:
    """
    Import, while still root, every module a call may load later: LMGate's own
    and the codecs the relay loads on first use (C{encodings.idna} for upstream
    host names). Once twistd has dropped privileges, the service user may be
    unable to read the Python installation (one under C{/root}, say): an import
    failing in the middle of a call would leave the call unanswered.
    """
    import importlib
    import pkgutil

    import lmgate

    for module in pkgutil.walk_packages(lmgate.__path__, "lmgate."):
        if module.name not in _NOT_PRELOADED:
            importlib.import_module(module.name)
    for name in ("encodings.idna", "stringprep", "gzip", "zlib"):
        importlib.import_module(name)


def makeService(options: usage.Options) -> IService:
    """The plugin's entry point."""
    configPath = options["config"] or os.environ.get("LMGATE_CONFIG") or None
    owner = ownerFor(options)
    if owner is not None:
        preloadModules()
    service = serviceFor(
        configPath,
        options["listen"],
        workers=options["workers"],
        workerFd=options["worker-fd"],
        workerIndex=options["worker-index"],
        owner=owner,
    )
    exitNonZeroOnLoss(service)
    return service
