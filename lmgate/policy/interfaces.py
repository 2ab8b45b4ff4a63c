"""
What a policy plugin is (L{IPolicy}), what it is shown of a call
(L{PolicyCall}) and what it answers (L{PolicyDecision}).

A plugin is named in C{policy.plugins[].factory} as C{module:attribute}; the
attribute is called with the entry's C{options} as keyword arguments at
start-up, and what it returns must provide L{IPolicy} (checked with
C{verifyObject}). docs/policy.md shows a complete plugin and its test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import Deferred
from zope.interface import Interface


class PolicyCall:
    """
    A read-only view of a call, for a plugin deciding on it before it is sent
    (made for every call: the headers are copied only when a plugin reads them).

    @ivar keyId: the caller's allow-list id (the record's C{lmgate_id}).
    @ivar owner: the caller's owner (allow-list).
    @ivar provider: the route the call goes to.
    @ivar method: the request method (C{POST}).
    @ivar path: the path after the route's prefix (C{/v1/chat/completions}).
    @ivar model: the model the client asked for (the alias, if it used one),
        or None when it named none.
    @ivar alias: the model alias the client used, or None.
    @ivar headers: the request headers, lower-case names, every credential
        header removed: a tuple of C{(name, value)} text pairs.
    @ivar body: the request body as the client sent it (an alias's model
        rewritten), or None when LMGate spooled it to a file (over 1 MiB).
    @ivar bodySize: the request body's size in bytes.
    @ivar requestId: the call's id (its record's C{request_id}).
    """

    __slots__ = ("keyId", "owner", "provider", "method", "path", "model", "alias", "_headers", "body", "bodySize", "requestId")

    def __init__(
        self,
        keyId: str,
        owner: str,
        provider: str,
        method: str,
        path: str,
        model: str | None,
        alias: str | None,
        headers: tuple[tuple[str, str], ...] | Callable[[], tuple[tuple[str, str], ...]],
        body: bytes | None,
        bodySize: int,
        requestId: str,
    ) -> None:
        """
        @param headers: the headers, or a function making them (called once,
            when a plugin first reads them).
        """
        self.keyId, self.owner, self.provider, self.method, self.path = keyId, owner, provider, method, path
        self.model, self.alias, self._headers = model, alias, headers
        self.body, self.bodySize, self.requestId = body, bodySize, requestId

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        headers = self._headers
        if callable(headers):
            headers = self._headers = headers()
        return headers

    def __repr__(self) -> str:
        return (
            f"PolicyCall(keyId={self.keyId!r}, owner={self.owner!r}, provider={self.provider!r}, method={self.method!r}, "
            f"path={self.path!r}, model={self.model!r}, alias={self.alias!r}, bodySize={self.bodySize!r}, requestId={self.requestId!r})"
        )


@dataclass(frozen=True)
class PolicyDecision:
    """
    A plugin's answer about one call.

    @ivar allow: let the call on (True) or refuse it (False).
    @ivar message: what a refused caller reads (LMGate names the plugin in front of it).
    @ivar status: a refusal's status: 403 (not allowed) or 400 (the request asks too much).
    @ivar audit: the call's bodies go to the audit log.
    @ivar tags: labels the call carries into its record.
    """

    allow: bool = True
    message: str = "The request is not allowed by the gateway's policy."
    status: int = 403
    audit: bool = False
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.status not in (400, 403):
            raise ValueError(f"A policy decision's status is 400 or 403, not {self.status!r}")
        if isinstance(self.tags, (str, bytes)) or not all(isinstance(t, str) for t in self.tags):
            raise ValueError(f"A policy decision's tags are a tuple of strings, not {self.tags!r}")

    @classmethod
    def deny(cls, message: str, status: int = 403, tags: tuple[str, ...] = ()) -> PolicyDecision:
        """A refusal with C{message} (403, or 400 for a request that asks too much)."""
        return cls(allow=False, message=message, status=status, tags=tags)


#: Allow the call, nothing else to say.
ALLOW = PolicyDecision()


class IPolicy(Interface):
    """A policy plugin: decides on each admitted call before it is sent, and sees its record after."""

    def decide(call: PolicyCall) -> PolicyDecision | None | Deferred[PolicyDecision | None]:
        """
        Decide on C{call} (None allows it), now or with a L{Deferred}.

        Called after the configured rules let the call on, plugins in their
        configured order. An exception, a failed Deferred, or no answer within
        C{policy.plugin_timeout} refuses the call 503 (fail closed). A
        Deferred is cancelled when the client leaves or the wait times out.
        """

    def observe(record: Any) -> None:
        """
        See the call's record (an L{lmgate.records.record.UsageRecord}) once
        it is handed to the writer. Exceptions are logged and change nothing.
        """
