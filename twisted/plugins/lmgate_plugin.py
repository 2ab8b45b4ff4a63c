"""
The twistd plugin: C{twistd -n lmgate --config etc/lmgate.yaml}.

This directory has no C{__init__.py}: it extends Twisted's own C{twisted.plugins}.
Imports of LMGate are late, so C{twistd --help} never breaks because of LMGate.
"""

from __future__ import annotations

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class _GatewayMaker:
    tapname = "lmgate"
    description = "Pass-through gateway for LLM provider APIs: access control and usage records."

    @property
    def options(self) -> type[usage.Options]:
        from lmgate.daemon.options import Options

        return Options

    def makeService(self, options: usage.Options) -> IService:
        from lmgate.daemon.tap import makeService

        return makeService(options)


serviceMaker = _GatewayMaker()
