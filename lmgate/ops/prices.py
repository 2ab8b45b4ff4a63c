"""
Prices per million tokens, and the cost of one call.

The table (C{etc/prices.yaml}) is the operator's: dated, editable, checked at
start-up. A cost is computed only from counts the provider reported: an unknown
model or an unknown input count gives None, never a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import yaml

from lmgate.errors import ConfigError

_REGION = re.compile(r"^(us|eu|apac|global|us-gov|ca|jp|au)\.")
_VERSION = re.compile(r":\d+$")


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens."""

    input: float
    output: float
    cachedInput: float
    cacheWrite: float


class PriceTable:
    def __init__(self, prices: Mapping[str, Price], asOf: str = "") -> None:
        self._prices = dict(prices)
        self.asOf = asOf
        self._byLength = sorted(self._prices, key=len, reverse=True)

    @classmethod
    def load(cls, path: str) -> "PriceTable":
        """
        @raise ConfigError: the file cannot be read or a model's entry is wrong.
        """
        try:
            with open(path, "rb") as f:
                raw = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError(path, None, f"cannot read: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(path, None, f"not valid YAML: {e}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
            raise ConfigError(path, "models", "must be a mapping of model id to prices")
        prices = {}
        for model, entry in raw["models"].items():
            where = f"models.{model}"
            if not isinstance(entry, dict):
                raise ConfigError(path, where, "must be a mapping (input, output, cached_input, cache_write)")
            unknown = set(entry) - {"input", "output", "cached_input", "cache_write"}
            if unknown:
                raise ConfigError(path, f"{where}.{sorted(unknown)[0]}", "unknown key")
            values: dict[str, float] = {}
            for key in ("input", "output", "cached_input", "cache_write"):
                value = entry.get(key, entry.get("input") if key in ("cached_input", "cache_write") else None)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise ConfigError(path, f"{where}.{key}", f"must be a number >= 0, got {value!r}")
                values[key] = float(value)
            prices[str(model)] = Price(values["input"], values["output"], values["cached_input"], values["cache_write"])
        return cls(prices, str(raw.get("as_of", "")))

    def priceFor(self, model: str | None) -> Price | None:
        """Exact id, else the longest prefix entry; Bedrock ids also without region prefix and version suffix."""
        if not model:
            return None
        candidates = [model]
        bare = _VERSION.sub("", _REGION.sub("", model))
        if bare != model:
            candidates.append(bare)
        for candidate in candidates:
            if candidate in self._prices:
                return self._prices[candidate]
        for candidate in candidates:
            for key in self._byLength:
                if candidate.startswith(key):
                    return self._prices[key]
        return None

    def cost(self, model: str | None, input: int | None, output: int | None, cached: int | None, cacheWrite: int | None) -> float | None:
        """
        The call's cost in US dollars, or None when the model or the input count
        is unknown. An output count that was not reported is no output (an
        embedding has none, and its usage names none); cached and cache-write
        counts that were not reported count as 0 (the providers that have them
        report them).
        """
        price = self.priceFor(model)
        if price is None or input is None:
            return None
        output, cached, cacheWrite = output or 0, cached or 0, cacheWrite or 0
        uncached = max(0, input - cached - cacheWrite)
        dollars = (uncached * price.input + cached * price.cachedInput + cacheWrite * price.cacheWrite + output * price.output) / 1e6
        return round(dollars, 9)
