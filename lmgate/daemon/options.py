"""
The command line of C{twistd lmgate}: its options, the settings they name,
the environment variables that name nothing, and the user twistd switches to.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.logger import Logger
from twisted.python import usage

from lmgate.config import Settings, loadSettings
from lmgate.daemon.demo import demoSettings

log = Logger()


class Options(usage.Options):
    """C{twistd lmgate} options."""

    synopsis = "[--config PATH] [--listen ENDPOINT]"
    longdesc = (
        "Pass-through gateway for LLM provider APIs: access control and usage records. "
        "Without --config (or LMGATE_CONFIG), runs the embedded demo: every provider "
        "routed to a stub upstream in the same process, key 'lmgate-demo-key'."
    )
    optParameters = [
        ["config", "c", None, "The YAML configuration file (default: $LMGATE_CONFIG, else the embedded demo)."],
        ["listen", "l", None, "A Twisted server endpoint string, overriding the file's `listen`."],
        ["workers", "w", 1, "Worker processes sharing the listening socket (tcp: endpoints).", int],
        ["worker-fd", None, None, "(internal) the shared socket a worker adopts.", int],
        ["worker-index", None, None, "(internal) this worker's number.", int],
    ]

    def postOptions(self) -> None:
        if self["workers"] < 1:
            raise usage.UsageError("--workers must be 1 or more")


def settingsFor(configPath: str | None, listen: str | None = None) -> Settings:
    """
    The settings for a config path (L{None}: the embedded demo), with a
    command-line C{--listen} on top.

    @raise ConfigError: for anything wrong.
    """
    settings = demoSettings() if configPath is None else loadSettings(configPath)
    if listen is not None:
        from dataclasses import replace

        settings = replace(settings, listen=listen)
    return settings


def warnIgnoredEnvironment() -> None:
    """One line naming the C{LMGATE_*} variables that are no configuration key."""
    from lmgate.config import ignoredEnvironment

    ignored = ignoredEnvironment(os.environ)
    if ignored:
        log.warn(
            "Ignoring environment variables that name no configuration key: {names}",
            names=", ".join(ignored),
        )


def ownerFor(options: usage.Options) -> tuple[int, int] | None:
    """
    The C{(uid, gid)} twistd will switch to once the service is built, when it
    runs as root with C{--uid} (an init script's C{USER}); None otherwise.
    """
    import pwd

    parent: Any = getattr(options, "parent", None)
    if parent is None or os.geteuid() != 0 or parent.get("uid") is None:
        return None
    uid = int(parent["uid"])
    gid = parent.get("gid")
    if gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = os.getegid()
    return uid, int(gid)
