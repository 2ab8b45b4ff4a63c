"""
End to end: C{policy.stream_usage: true} in the running daemon, driven by the
openai SDK and by raw SSE (treq), against the stub upstream, which (like
OpenAI) sends the usage chunk only when the request asks for it.
"""

from __future__ import annotations

import json
from typing import Any

from tests.daemon import inThread, readRecords
from tests.test_daemon import PLAIN_KEY, DaemonTestCase

MESSAGES = [{"role": "user", "content": "count the words in this prompt"}]


def comparable(chunk: Any) -> dict[str, Any]:
    """An SDK chunk without the fields that differ per call (its id)."""
    data: dict[str, Any] = chunk.model_dump()
    data.pop("id")
    return data


def events(body: bytes) -> list[bytes]:
    """The data of each event of a raw stream."""
    return [block[len(b"data: ") :] for block in body.split(b"\n\n") if block.startswith(b"data: ")]


class StreamUsageDaemonTests(DaemonTestCase):
    def config(self, **extra: str) -> str:
        return super().config(**extra) + "policy: {stream_usage: true}\n"

    async def test_openaiSDK(self) -> None:
        """
        The SDK's stream through the daemon is chunk for chunk the one it gets
        from the upstream without the option (only the usage chunk is not
        there), while the record has the counts the usage chunk carried.
        """
        daemon = await self.startDaemon()
        headers = {"x-lmgate-stub-delay-ms": "2"}  # each event in its own write

        def streams() -> tuple[list[Any], list[Any], list[Any]]:
            import openai

            def create(client: Any, **extra: Any) -> list[Any]:
                return list(client.chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=headers, **extra
                ))

            gateway = openai.OpenAI(base_url=self.base + "/openai/v1", api_key=PLAIN_KEY, max_retries=0, timeout=20)
            direct = openai.OpenAI(base_url=self.stubURL + "/v1", api_key="sk-stub", max_retries=0, timeout=20)
            return create(gateway), create(direct), create(direct, stream_options={"include_usage": True})

        through, direct, withUsage = await inThread(streams)
        self.assertEqual([comparable(c) for c in through], [comparable(c) for c in direct])
        self.assertTrue(all(c.choices and c.usage is None for c in through))
        usage = withUsage[-1].usage
        self.assertEqual(withUsage[-1].choices, [])
        self.assertEqual(await daemon.stop(), 0)
        [record] = readRecords(self.statsPath)
        self.assertEqual(
            (record["usage_source"], record["streaming"], record["input_tokens"], record["output_tokens"]),
            ("response", True, usage.prompt_tokens, usage.completion_tokens),
        )

    async def test_rawSSE(self) -> None:
        """
        Raw SSE through treq: every event but the usage chunk arrives
        (C{[DONE]} last), the client that asked for usage still gets it, and
        C{response_bytes} is what each client received.
        """
        import treq

        daemon = await self.startDaemon()
        url = self.base + "/openai/v1/chat/completions"
        auth = {"Authorization": f"Bearer {PLAIN_KEY}", "x-lmgate-stub-events": "5"}
        bodies = []
        for extra in ({}, {"stream_options": {"include_usage": True}}):
            request = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, **extra}).encode()
            response = await treq.post(url, request, headers=auth, persistent=False)
            self.assertEqual(response.code, 200)
            bodies.append(await response.content())
        filtered, asked = (events(b) for b in bodies)
        self.assertEqual(filtered[-1], b"[DONE]")
        self.assertEqual(len(filtered), 1 + 5 + 1 + 1)  # role, deltas, finish, [DONE]
        self.assertTrue(all(json.loads(e)["choices"] for e in filtered[:-1]))
        self.assertEqual(json.loads(asked[-2])["choices"], [])
        self.assertEqual(len(asked), len(filtered) + 1)
        self.assertEqual(await daemon.stop(), 0)
        records = readRecords(self.statsPath)
        self.assertEqual([r["usage_source"] for r in records], ["response", "response"])
        self.assertEqual([r["output_tokens"] for r in records], [5, 5])
        self.assertEqual([r["response_bytes"] for r in records], [len(b) for b in bodies])
