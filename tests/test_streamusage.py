"""
Exact usage on every stream: the request body rewrite that asks for the usage
chunk, and the filter that keeps it from the client.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import TestCase

from lmgate.policy.streamusage import (
    HOLD_LIMIT,
    UsageChunkFilter,
    addIncludeUsage,
    isUsageChunk,
    wantsIncludeUsage,
)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "openai", "chat_completions_stream_usage.sse")


class AddIncludeUsageTests(TestCase):
    """L{addIncludeUsage} inserts the option and changes no other byte."""

    def check(self, body: bytes, expected: bytes | None) -> None:
        rewritten = addIncludeUsage(body)
        self.assertEqual(rewritten, expected)
        if rewritten is not None:
            parsed = json.loads(rewritten)
            self.assertIs(parsed["stream_options"]["include_usage"], True)

    def test_added(self) -> None:
        """No C{stream_options}: the member goes before the object's closing brace, nothing else changes."""
        self.check(b'{"model":"gpt-4o","stream":true}', b'{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}')

    def test_modelNotFirstAndWhitespace(self) -> None:
        """Whitespace, newlines and member order are kept exactly."""
        body = b'\n{ "stream" : true ,\n  "messages": [{"role": "user", "content": "hi"}],\n  "model": "gpt-4o"\n}\n'
        self.check(body, body[:-2] + b',"stream_options":{"include_usage":true}' + body[-2:])

    def test_insideStreamOptions(self) -> None:
        """An existing C{stream_options} object gets the member; its other members stay."""
        self.check(
            b'{"stream":true,"stream_options":{"include_obfuscation":false},"model":"m"}',
            b'{"stream":true,"stream_options":{"include_obfuscation":false,"include_usage":true},"model":"m"}',
        )
        self.check(b'{"stream":true,"stream_options":{ }}', b'{"stream":true,"stream_options":{ "include_usage":true}}')

    def test_falseOrNullReplaced(self) -> None:
        """C{include_usage: false} (or null) did not ask for usage: its value becomes true, in place."""
        self.check(
            b'{"stream_options": {"include_usage": false}, "stream": true}',
            b'{"stream_options": {"include_usage": true}, "stream": true}',
        )
        self.check(b'{"stream":true,"stream_options":{"include_usage":null}}', b'{"stream":true,"stream_options":{"include_usage":true}}')
        self.check(b'{"stream":true,"stream_options":null}', b'{"stream":true,"stream_options":{"include_usage":true}}')

    def test_untouched(self) -> None:
        """Asked for already, not streaming, not a JSON object, ambiguous or odd: left alone."""
        for body in [
            b'{"stream":true,"stream_options":{"include_usage":true}}',
            b'{"stream":false}',
            b'{"model":"m"}',
            b'{"stream":"true"}',
            b'{"stream":true,"stream":false}',
            b'{"stream":true',
            b'["stream",true]',
            b'{"stream":true} x',
            b'{"stream":true,"stream_options":[]}',
            b'{"stream":true,"stream_options":{"include_usage":1}}',
            b'{"stream":true,"stream_options":{},"stream_options":{}}',
            b'{"stream":true,"stream_options":{"include_usage":false,"include_usage":false}}',
            b'\xff{"stream":true}',
            b"",
        ]:
            self.assertIsNone(addIncludeUsage(body), body)

    def test_escapedAndNested(self) -> None:
        """Keys in strings or nested objects are not taken for the top-level ones; escaped keys are decoded."""
        body = b'{"messages":[{"content":"\\"stream\\":true, \\"stream_options\\": {}"}],"meta":{"stream_options":{"include_usage":true}},"stream":true}'
        self.check(body, body[:-1] + b',"stream_options":{"include_usage":true}}')
        self.check(b'{"str\\u0065am":true}', b'{"str\\u0065am":true,"stream_options":{"include_usage":true}}')

    def test_nonASCII(self) -> None:
        """Offsets are bytes when the body is not ASCII."""
        body = '{"messages":[{"content":"héllo ☃"}],"stream":true,"stream_options":{"x":1}}'.encode()
        self.check(body, body[:-2] + b',"include_usage":true}}')

    def test_operations(self) -> None:
        """Only POSTs to the OpenAI completions operations may get it (not the Responses API, not other formats)."""
        self.assertTrue(wantsIncludeUsage(b"POST", "openai", b"/v1/chat/completions"))
        self.assertTrue(wantsIncludeUsage(b"POST", "openai", b"/v1/completions"))
        self.assertTrue(wantsIncludeUsage(b"POST", "openai", b"/openai/deployments/d/chat/completions"))
        self.assertFalse(wantsIncludeUsage(b"POST", "openai", b"/v1/responses"))
        self.assertFalse(wantsIncludeUsage(b"GET", "openai", b"/v1/chat/completions"))
        self.assertFalse(wantsIncludeUsage(b"POST", "anthropic", b"/v1/chat/completions"))


USAGE = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
CONTENT = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}'
REVERSED = b'data: {"usage":{"prompt_tokens":3},"choices":[]}'  # another member order


def stream(events: list[bytes], eol: bytes) -> tuple[bytes, bytes]:
    """A stream of C{events} with C{eol} line endings, and what the client should get (the usage chunks gone)."""
    whole, kept = [], []
    for event in events:
        framed = event.replace(b"\n", eol) + eol + eol
        whole.append(framed)
        if not isUsageChunk(framed):
            kept.append(framed)
    return b"".join(whole), b"".join(kept)


def filtered(pieces: list[bytes]) -> bytes:
    f = UsageChunkFilter()
    return b"".join(f.feed(piece) for piece in pieces) + f.flush()


class UsageChunkFilterTests(TestCase):
    """L{UsageChunkFilter} removes exactly the usage chunk, whatever the reads' boundaries."""

    EVENTS = [
        b": keepalive",
        CONTENT,
        b"event: ping\ndata: {}",
        b'data: {"choices":[],\ndata: "usage":{"total_tokens":1}}',  # one event over two data lines
        CONTENT.replace(b"usage", b"x"),
        b'data: {"choices":[],"usage":null,"prompt_filter_results":[]}',  # Azure's first chunk: kept
        USAGE,
        REVERSED,
        b"data: [DONE]",
    ]

    def test_isUsageChunk(self) -> None:
        """The usage chunk is a data-only event with no choices and a usage object."""
        self.assertTrue(isUsageChunk(USAGE + b"\n\n"))
        self.assertTrue(isUsageChunk(REVERSED + b"\r\n\r\n"))
        for event in [CONTENT, b"data: [DONE]", b": x", b"id: 1\n" + USAGE, b'data: {"choices":[],"usage":null}', b"data: {"]:
            self.assertFalse(isUsageChunk(event + b"\n\n"), event)

    def test_wholeReads(self) -> None:
        """Each event in its own read, and all in one read: the usage chunks go, every other byte stays."""
        for eol in (b"\n", b"\r\n", b"\r"):
            whole, kept = stream(self.EVENTS, eol)
            self.assertEqual(filtered([whole]), kept)
            self.assertEqual(filtered([e.replace(b"\n", eol) + eol + eol for e in self.EVENTS]), kept)
            self.assertNotIn(b"total_tokens", kept.replace(b'"usage":{"total_tokens":1}', b""))

    def test_everySplit(self) -> None:
        """A stream cut into two reads at every byte position, and into three around every event boundary, with every line ending."""
        for eol in (b"\n", b"\r\n", b"\r"):
            whole, kept = stream([CONTENT, USAGE, b"data: [DONE]"], eol)
            for i in range(len(whole) + 1):
                self.assertEqual(filtered([whole[:i], whole[i:]]), kept, (eol, i))
            for i in range(len(whole) - 12):
                self.assertEqual(filtered([whole[:i], whole[i : i + 7], whole[i + 7 :]]), kept, (eol, i))

    def test_byteByByte(self) -> None:
        """One byte per read, the recorded OpenAI stream and the mixed events."""
        with open(FIXTURE, "rb") as f:
            recorded = f.read()
        expected = recorded.replace(recorded[recorded.rindex(b'data: {"id"') : recorded.rindex(b"data: [DONE]")], b"")
        self.assertNotEqual(expected, recorded)
        self.assertEqual(filtered([recorded[i : i + 1] for i in range(len(recorded))]), expected)
        for eol in (b"\n", b"\r\n", b"\r"):
            whole, kept = stream(self.EVENTS, eol)
            self.assertEqual(filtered([whole[i : i + 1] for i in range(len(whole))]), kept, eol)

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from([b"\n", b"\r\n", b"\r"]), st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
    def test_anySplits(self, eol: bytes, cuts: list[int]) -> None:
        """Any number of reads cut anywhere: the client's bytes are the stream without its usage chunks."""
        whole, kept = stream(self.EVENTS, eol)
        points = sorted({min(c, len(whole)) for c in cuts} | {0, len(whole)})
        self.assertEqual(filtered([whole[a:b] for a, b in zip(points, points[1:])]), kept)

    def test_wholeEventsNeverWait(self) -> None:
        """
        The recorded OpenAI stream written an event per read, as providers
        write: each read's bytes reach the client in the same call, all but
        the usage chunk's; nothing is held from one read to the next.
        """
        with open(FIXTURE, "rb") as f:
            recorded = f.read()
        f = UsageChunkFilter()
        blocks = [block + b"\n\n" for block in recorded.split(b"\n\n") if block]
        passed = [f.feed(block) for block in blocks]
        self.assertEqual([p for p, b in zip(passed, blocks) if p != b], [b""])
        self.assertEqual((f.removed, f.flush()), (1, b""))

    def test_heldOnlyWhileItMayBeTheUsageChunk(self) -> None:
        """
        Comments, [DONE] and content chunks are released as soon as their
        first bytes show what they are, before their event ends; only a
        chunk that may be the usage chunk waits for its end.
        """
        f = UsageChunkFilter()
        self.assertEqual(f.feed(b": ke"), b": ke")
        self.assertEqual(f.feed(b"epalive\n\nda"), b"epalive\n\n")
        self.assertEqual(f.feed(b"ta: [D"), b"data: [D")
        self.assertEqual(f.feed(b"ONE]\n\n"), b"ONE]\n\n")
        half = CONTENT.index(b"[{") + 2
        self.assertEqual(f.feed(CONTENT[:half]), CONTENT[:half])
        self.assertEqual(f.feed(CONTENT[half:] + b"\n"), CONTENT[half:] + b"\n")
        self.assertEqual(f.feed(b"\n" + USAGE[:40]), b"\n")
        self.assertEqual(f.feed(USAGE[40:] + b"\n"), b"")
        self.assertEqual(f.feed(b"\n"), b"")
        self.assertEqual(f.removed, 1)

    def test_unfinishedEventFlushed(self) -> None:
        """A stream that ends inside an event: what was held reaches the client at the end (unless it is the usage chunk)."""
        f = UsageChunkFilter()
        self.assertEqual(f.feed(b'data: {"choices":[]'), b"")
        self.assertEqual(f.flush(), b'data: {"choices":[]')
        f = UsageChunkFilter()
        self.assertEqual(f.feed(USAGE + b"\n"), b"")
        self.assertEqual(f.flush(), b"")

    def test_holdBounded(self) -> None:
        """An event longer than L{HOLD_LIMIT} is relayed as it comes: memory stays bounded."""
        f = UsageChunkFilter()
        big = b'data: {"choices":[],"x":"' + b"a" * HOLD_LIMIT
        out = f.feed(big[:100]) + f.feed(big[100:])
        self.assertEqual(out, big)
        self.assertEqual(f.feed(b'"}\n\n'), b'"}\n\n')
