"""
The admission step that applies the gateway's policy (L{lmgate.policy.engine.Policy}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zope.interface import implementer

from lmgate.gate.admission import CallContext, IAdmissionStep, Verdict

if TYPE_CHECKING:
    from lmgate.gate.gateway import Gateway


@implementer(IAdmissionStep)
class PolicyStep:
    """
    The policy's rules, then its plugins (C{policy:}): a refused call is
    answered 403 or 400 (a plugin that fails, 503) in the provider's shape and
    never relayed. After the model alias is resolved (a rule sees the alias the
    client asked for), before the usage limits (a refused call reserves
    nothing). Without rules and plugins the step costs one truth test.
    """

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def admit(self, context: CallContext) -> Verdict:
        policy = self._gateway.policy
        if policy is None or not policy.active or context.provider is self._gateway.unified:
            return None  # no rules or plugins; or GET /v1/models, answered by the gateway itself
        return policy.admit(context)
