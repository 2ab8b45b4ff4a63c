"""
How usage-limit states are shown to operators: the admin port's C{/limits}
JSON and C{lmgate limits show} read the same dicts.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from lmgate.limits.settings import NANO
from lmgate.limits.store import FigureState


def stateDict(state: FigureState, now: float | None = None) -> dict[str, Any]:
    """
    One figure's state: its counter, rule, kind, and limit / used / reserved /
    remaining in the figure's unit (dollars for C{usd_*}), seconds until it is
    back at its full limit and that moment (UTC).
    """
    figure = state.figure
    scale = NANO if figure.kind.startswith("usd_") else 1

    def unit(value: int) -> int | float:
        return value / scale if scale != 1 else value

    now = datetime.now(timezone.utc).timestamp() if now is None else now
    return {
        "counter": figure.counter,
        "rule": figure.rule,
        "kind": figure.kind,
        "limit": unit(figure.limit),
        "used": unit(state.used),
        "reserved": unit(state.reserved),
        "remaining": unit(state.remaining),
        "reset_seconds": round(state.reset, 3),
        "resets_at": datetime.fromtimestamp(now + state.reset, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
