"""
The policy plugins LMGate ships (C{policy.plugins[].factory}).

C{lmgate.policy.plugins:RegexGuard} scans request bodies with regular
expressions and refuses (or audits, or tags) the calls whose body matches.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from twisted.logger import Logger
from zope.interface import implementer

from lmgate.policy.interfaces import IPolicy, PolicyCall, PolicyDecision

log = Logger()

_ACTIONS = ("deny", "audit")
_UNREAD = ("match", "pass")


@implementer(IPolicy)
class RegexGuard:
    """
    A regular-expression guard over request bodies.

    The body is decoded as UTF-8 (undecodable bytes replaced) and searched
    with each pattern in order; on the first match the call is refused 403
    with C{message} (C{action: deny}) or let on with its bodies sent to the
    audit log (C{action: audit}); either way it carries C{tags}. Logs name the
    pattern's index and the request id, never the text that matched.

    The text is searched as sent: a JSON string escape (C{\\u0041}) is not
    decoded first. A body LMGate spooled to a file (over 1 MiB) is not read:
    with C{unread: match} (the default) it is treated as matching (fail
    closed), with C{unread: pass} as not matching.

    @param patterns: Python regular expressions (C{re} syntax).
    @param action: C{deny} or C{audit}.
    @param message: what a refused caller reads.
    @param tags: labels a matching call carries into its record.
    @param ignore_case: search case-insensitively.
    @param unread: C{match} or C{pass}: how a spooled body counts.
    """

    def __init__(
        self,
        patterns: Sequence[str],
        action: str = "deny",
        message: str = "The request's content is not allowed through this gateway.",
        tags: Sequence[str] = (),
        ignore_case: bool = False,
        unread: str = "match",
    ) -> None:
        if isinstance(patterns, str) or not patterns:
            raise ValueError("patterns must be a non-empty list of regular expressions")
        if action not in _ACTIONS:
            raise ValueError(f"action must be deny or audit, got {action!r}")
        if unread not in _UNREAD:
            raise ValueError(f"unread must be match or pass, got {unread!r}")
        if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
            raise ValueError(f"tags must be a list of strings, got {tags!r}")
        flags = re.IGNORECASE if ignore_case else 0
        compiled = []
        for index, pattern in enumerate(patterns):
            try:
                compiled.append(re.compile(pattern, flags))
            except (re.error, TypeError) as e:
                raise ValueError(f"patterns[{index}] is not a regular expression: {e}") from None
        self._patterns = tuple(compiled)
        self._deny, self._message, self._tags = action == "deny", message, tuple(tags)
        self._unreadMatches = unread == "match"

    def matching(self, body: bytes) -> int | None:
        """The index of the first pattern found in C{body}, or None."""
        text = body.decode("utf-8", "replace")
        for index, pattern in enumerate(self._patterns):
            if pattern.search(text) is not None:
                return index
        return None

    def decide(self, call: PolicyCall) -> PolicyDecision | None:
        body = call.body
        if body is None and call.bodySize:
            if not self._unreadMatches:
                return None
            log.info("RegexGuard: request {requestId} not scanned (spooled body): counted as a match", requestId=call.requestId)
            return self._matched(f"{self._message} (the body is too large to be checked)")
        if not body:
            return None
        index = self.matching(body)
        if index is None:
            return None
        log.info("RegexGuard: pattern {index} matched request {requestId}", index=index, requestId=call.requestId)
        return self._matched(self._message)

    def _matched(self, message: str) -> PolicyDecision:
        if self._deny:
            return PolicyDecision.deny(message, tags=self._tags)
        return PolicyDecision(audit=True, tags=self._tags)

    def observe(self, record: Any) -> None:
        pass
