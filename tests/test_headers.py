"""Hop-by-hop headers stop at the gateway; everything else crosses unchanged."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from lmgate.relay.headers import copyEndToEndHeaders, upstreamRequestHeaders


class RequestHeaderTests(SynchronousTestCase):
    def test_hopByHopAndHostDropped(self) -> None:
        """Connection, the headers it names, Keep-Alive, Proxy-*, TE, Trailer,
        Transfer-Encoding, Upgrade, Host and Content-Length do not go upstream."""
        received = Headers(
            {
                b"Host": [b"gate:8080"],
                b"Connection": [b"keep-alive, X-Private"],
                b"X-Private": [b"1"],
                b"Keep-Alive": [b"timeout=5"],
                b"Proxy-Authorization": [b"Basic x"],
                b"Proxy-Connection": [b"keep-alive"],
                b"TE": [b"trailers"],
                b"Trailer": [b"X-T"],
                b"Transfer-Encoding": [b"chunked"],
                b"Upgrade": [b"h2c"],
                b"Content-Length": [b"12"],
                b"Authorization": [b"Bearer k"],
                b"Accept-Encoding": [b"gzip"],
                b"X-Multi": [b"a", b"b"],
            }
        )
        sent = upstreamRequestHeaders(received)
        self.assertEqual(
            sorted((k.lower(), v) for k, v in sent.getAllRawHeaders()),
            [(b"accept-encoding", [b"gzip"]), (b"authorization", [b"Bearer k"]), (b"x-multi", [b"a", b"b"])],
        )


class ResponseHeaderTests(SynchronousTestCase):
    def test_endToEndCopied(self) -> None:
        """A response's end-to-end headers are copied, repeated ones in order."""
        source = Headers(
            {
                b"Content-Type": [b"text/event-stream"],
                b"Set-Cookie": [b"a=1", b"b=2"],
                b"Connection": [b"X-Hop"],
                b"X-Hop": [b"1"],
                b"Keep-Alive": [b"timeout=5"],
                b"Content-Encoding": [b"gzip"],
            }
        )
        destination = Headers()
        copyEndToEndHeaders(source, destination)
        self.assertEqual(
            sorted((k.lower(), v) for k, v in destination.getAllRawHeaders()),
            [
                (b"content-encoding", [b"gzip"]),
                (b"content-type", [b"text/event-stream"]),
                (b"set-cookie", [b"a=1", b"b=2"]),
            ],
        )
