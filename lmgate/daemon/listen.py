"""
Listening: endpoint strings from the settings, the foreground check that an
address can be bound before twistd forks, and the listener whose failure to
listen is one line naming the endpoint.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString

from lmgate.config import Settings
from lmgate.errors import ConfigError
from lmgate.relay.twistedprivate import raiseListenErrorsAtStart, serverEndpointAddress


def endpointFor(reactor: Any, description: str, settings: Settings, key: str) -> Any:
    """
    The server endpoint for C{description} (the setting C{key}).

    @raise ConfigError: Twisted cannot parse it.
    """
    try:
        return serverFromString(reactor, description)
    except Exception as e:
        raise ConfigError(settings.source, key, f"not a usable endpoint ({e}): {description!r}") from None


def cannotListen(description: str, error: BaseException) -> str:
    """
    C{cannot listen on tcp:8080:interface=127.0.0.1: address already in use}:
    the endpoint as configured and the system's reason.
    """
    from twisted.internet.error import CannotListenError

    if isinstance(error, CannotListenError) and error.socketError is not None:
        error = error.socketError
    reason = getattr(error, "strerror", None) or str(error)
    return f"cannot listen on {description}: {reason[:1].lower()}{reason[1:]}"


def checkCanListen(endpoint: Any, description: str, settings: Settings, key: str) -> None:
    """
    Bind a TCP endpoint's address once, in the foreground, before twistd forks:
    a port in use (or one this user may not bind) becomes one line and a
    non-zero exit, where the real bind after forking could only report a
    traceback or a truncated message. Other kinds of endpoint are bound by
    L{Listener} only.

    @raise ConfigError: the address cannot be bound.
    """
    import socket

    from twisted.internet.abstract import isIPv6Address
    from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint

    if not isinstance(endpoint, (TCP4ServerEndpoint, SSL4ServerEndpoint)):
        return
    port, interface, _ = serverEndpointAddress(endpoint)
    if not port:
        return
    family = socket.AF_INET6 if isinstance(endpoint, TCP6ServerEndpoint) or isIPv6Address(interface) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted binds
        try:
            probe.bind((interface, port))
            probe.listen(1)
        except OSError as e:
            raise ConfigError(settings.source, key, cannotListen(description, e)) from None


class Listener(StreamServerEndpointService):
    """
    A listening endpoint whose failure to listen (after the foreground check,
    or for an endpoint it cannot check) stops the start with one line naming
    the endpoint, instead of twistd's traceback.
    """

    def __init__(self, endpoint: Any, factory: Any, description: str) -> None:
        StreamServerEndpointService.__init__(self, endpoint, factory)
        self.description = description
        raiseListenErrorsAtStart(self)

    def privilegedStartService(self) -> None:
        from twisted.internet.error import CannotListenError

        try:
            StreamServerEndpointService.privilegedStartService(self)
        except CannotListenError as e:
            raise SystemExit(f"lmgate: {cannotListen(self.description, e)}") from None


def listenerFor(reactor: Any, description: str, factory: Any, settings: Settings, key: str) -> Listener:
    """The service listening on C{description} (the setting C{key}), checked in the foreground."""
    endpoint = endpointFor(reactor, description, settings, key)
    checkCanListen(endpoint, description, settings, key)
    return Listener(endpoint, factory, description)
