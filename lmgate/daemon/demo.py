"""
The embedded demo: what C{twistd -n lmgate} runs without a configuration file
(every provider routed to a stub upstream in the same process).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from twisted.logger import Logger

from lmgate.config import Settings, settingsFrom

log = Logger()

DEMO_SOURCE = "<embedded demo>"


def demoSettings(environ: Any = None) -> Settings:
    """The embedded default: stub upstreams in-process and a demo allow-list."""
    demo = resources.files("lmgate") / "demo"
    import yaml

    raw = yaml.safe_load((demo / "lmgate.yaml").read_text())
    raw.setdefault("allowlist", {})["path"] = str(demo / "allowlist.csv")
    # The packaged copy of etc/prices.yaml (kept identical by a test): the demo
    # prices its calls from any working directory.
    raw.setdefault("prices", {})["path"] = str(demo / "prices.yaml")
    return settingsFrom(raw, DEMO_SOURCE, environ)


def announceDemo(settings: Settings) -> None:
    """Say once at start-up that this is the demo, and how to call it."""
    if settings.source == DEMO_SOURCE:
        log.warn(
            "No --config given: running the embedded demo. Providers are routed to the stub "
            "upstream on {stub} (the managed openai route to the real OpenAI API when "
            "OPENAI_API_KEY is set); use the API key 'lmgate-demo-key'.",
            stub=settings.stubListen,
        )
