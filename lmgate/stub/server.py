"""
The stub upstream: each provider's main endpoints, answered in the provider's
own wire format with deterministic content and usage.

It lets the demo run on a machine without provider access, and it is the fake
upstream of the tests and benchmarks. One resource serves every provider, since
their paths do not collide. See docs/stub.md for what it answers and how it
counts tokens.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from itertools import count
from typing import Any, Callable
from urllib.parse import unquote

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import react
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from lmgate.usage import eventstream

REPLY = "This is the LMGate stub upstream answering {model}."
MAX_EVENTS = 100000
Json = dict[str, Any]


def words(text: str) -> int:
    return len(text.split())


def promptText(value: Any) -> str:
    """Every string in a request's prompt fields, joined (roles and model names excluded)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(promptText(v) for v in value)
    if isinstance(value, dict):
        return " ".join(promptText(v) for k, v in value.items() if k not in ("role", "model", "type", "modelId"))
    return ""


def inputTokens(body: Json, *fields: str) -> int:
    """The stub's input count: whitespace-separated words in the prompt fields, at least 1."""
    return max(1, words(" ".join(promptText(body.get(f)) for f in fields)))


class Answer:
    """A status, headers and body chunks, written with optional pacing."""

    def __init__(self, status: int, contentType: bytes, chunks: list[bytes], headers: dict[bytes, bytes] | None = None) -> None:
        self.status, self.contentType, self.chunks, self.headers = status, contentType, chunks, headers or {}


class StubResource(Resource):
    """
    The stub upstream's root. Request headers C{x-lmgate-stub-delay-ms} (pace a
    stream's events) and C{x-lmgate-stub-events} (how many content deltas) shape
    streams for demos and benchmarks.
    """

    isLeaf = True

    def __init__(self, clock: IReactorTime) -> None:
        Resource.__init__(self)
        self._clock = clock
        self._ids = count(1)
        self._routes: list[tuple[re.Pattern[bytes], Callable[..., Answer], str]] = [
            (re.compile(rb"^(?:/openai/deployments/([^/]+))?/(?:v1/)?chat/completions$"), self._chat, "openai"),
            (re.compile(rb"^(?:/openai/deployments/([^/]+))?/(?:v1/)?completions$"), self._completions, "openai"),
            (re.compile(rb"^(?:/openai/deployments/([^/]+))?/(?:v1/)?embeddings$"), self._embeddings, "openai"),
            (re.compile(rb"^()/v1/responses$"), self._responses, "openai"),
            (re.compile(rb"^()/v1/messages$"), self._messages, "anthropic"),
            (re.compile(rb"^/v1[a-z0-9]*/(?:projects/[^/]+/locations/[^/]+/publishers/google/)?models/([^/:]+):(generateContent|streamGenerateContent|countTokens)$"), self._gemini, "google"),
            (re.compile(rb"^/model/([^/]+)/(converse|converse-stream|invoke|invoke-with-response-stream)$"), self._bedrock, "bedrock"),
        ]

    # -- dispatch ---------------------------------------------------------------

    def render_GET(self, request: Request) -> bytes:
        path = request.path
        if path in (b"/v1/models", b"/models"):
            models = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
            return self._json(request, 200, {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "lmgate-stub"} for m in models]})
        return self._json(request, 404, {"error": {"type": "not_found", "message": "The stub upstream does not serve this path."}})

    def render_POST(self, request: Request) -> Any:
        path = request.path
        for pattern, handler, family in self._routes:
            match = pattern.match(path)
            if match is None:
                continue
            try:
                content: Any = request.content
                body = json.loads(content.read() or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except ValueError:
                return self._error(request, family)
            answer = handler(request, body, *[unquote(g.decode()) if g else None for g in match.groups()])
            return self._send(request, answer)
        return self._json(request, 404, {"error": {"type": "not_found", "message": "The stub upstream does not serve this path."}})

    def _json(self, request: Request, status: int, body: Json) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    def _error(self, request: Request, family: str) -> bytes:
        message = "The request body is not valid JSON."
        if family == "anthropic":
            return self._json(request, 400, {"type": "error", "error": {"type": "invalid_request_error", "message": message}})
        if family == "google":
            return self._json(request, 400, {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}})
        if family == "bedrock":
            request.setHeader(b"x-amzn-errortype", b"ValidationException")
            return self._json(request, 400, {"message": message})
        return self._json(request, 400, {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}})

    def _send(self, request: Request, answer: Answer) -> Any:
        request.setResponseCode(answer.status)
        request.setHeader(b"content-type", answer.contentType)
        for name, value in answer.headers.items():
            request.setHeader(name, value)
        if len(answer.chunks) == 1:
            return answer.chunks[0]
        delay = _header(request, b"x-lmgate-stub-delay-ms", 0, 60000) / 1000.0
        chunks = iter(answer.chunks)
        pending: list[IDelayedCall] = []

        def stop(reason: object) -> None:
            for call in pending:
                if call.active():
                    call.cancel()

        request.notifyFinish().addErrback(stop)

        def writeNext() -> None:
            pending.clear()
            for chunk in chunks:
                request.write(chunk)
                if delay:
                    pending.append(self._clock.callLater(delay, writeNext))
                    return
            request.finish()

        writeNext()
        return NOT_DONE_YET

    # -- helpers ------------------------------------------------------------------

    def _id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):08d}"

    def _deltas(self, request: Request, model: str) -> list[str]:
        """The reply as stream deltas: its words, or C{x-lmgate-stub-events} of them."""
        reply = REPLY.format(model=model).split(" ")
        n = _header(request, b"x-lmgate-stub-events", len(reply), MAX_EVENTS)
        return [(reply[i % len(reply)] + " ") for i in range(n)]

    # -- OpenAI -------------------------------------------------------------------------

    def _chat(self, request: Request, body: Json, deployment: str | None) -> Answer:
        model = deployment or str(body.get("model") or "gpt-4o-mini")
        prompt = inputTokens(body, "messages")
        created = 1767225600
        ident = self._id("chatcmpl-stub")
        headers = {b"x-request-id": self._id("req_stub").encode()}
        if not body.get("stream"):
            text = REPLY.format(model=model)
            usage = {"prompt_tokens": prompt, "completion_tokens": words(text), "total_tokens": prompt + words(text),
                     "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                     "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}}
            return Answer(200, b"application/json", [json.dumps({
                "id": ident, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}, "logprobs": None, "finish_reason": "stop"}],
                "usage": usage, "service_tier": "default", "system_fingerprint": "fp_stub"}).encode()], headers)
        includeUsage = bool((body.get("stream_options") or {}).get("include_usage"))
        deltas = self._deltas(request, model)

        def chunk(delta: Json, finish: str | None = None, choices: bool = True, usage: Any = None) -> bytes:
            data: Json = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                          "system_fingerprint": "fp_stub",
                          "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else []}
            if includeUsage:
                data["usage"] = usage
            return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

        chunks = [chunk({"role": "assistant", "content": "", "refusal": None})]
        chunks += [chunk({"content": d}) for d in deltas]
        chunks.append(chunk({}, "stop"))
        if includeUsage:
            out = len(deltas)
            chunks.append(chunk({}, choices=False, usage={"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out,
                                                         "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}))
        chunks.append(b"data: [DONE]\n\n")
        return Answer(200, b"text/event-stream; charset=utf-8", chunks, headers)

    def _completions(self, request: Request, body: Json, deployment: str | None) -> Answer:
        model = deployment or str(body.get("model") or "gpt-3.5-turbo-instruct")
        prompt = inputTokens(body, "prompt")
        text = REPLY.format(model=model)
        ident = self._id("cmpl-stub")
        if body.get("stream"):
            chunks = [b"data: " + json.dumps({"id": ident, "object": "text_completion", "created": 1767225600, "model": model,
                                             "choices": [{"text": d, "index": 0, "logprobs": None, "finish_reason": None}]}).encode() + b"\n\n"
                      for d in self._deltas(request, model)]
            return Answer(200, b"text/event-stream; charset=utf-8", chunks + [b"data: [DONE]\n\n"])
        return Answer(200, b"application/json", [json.dumps({
            "id": ident, "object": "text_completion", "created": 1767225600, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": words(text), "total_tokens": prompt + words(text)}}).encode()])

    def _embeddings(self, request: Request, body: Json, deployment: str | None) -> Answer:
        model = deployment or str(body.get("model") or "text-embedding-3-small")
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        prompt = inputTokens(body, "input")
        data = [{"object": "embedding", "index": i, "embedding": [0.0, 0.5, 1.0]} for i in range(len(items))]
        return Answer(200, b"application/json", [json.dumps({"object": "list", "data": data, "model": model,
                                                             "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}).encode()],
                      {b"x-request-id": self._id("req_stub").encode()})

    def _responses(self, request: Request, body: Json, _: Any) -> Answer:
        model = str(body.get("model") or "gpt-4o-mini")
        prompt = inputTokens(body, "input", "instructions")
        ident = self._id("resp_stub")
        text = REPLY.format(model=model)
        deltas = self._deltas(request, model) if body.get("stream") else [text]
        out = len(deltas) if body.get("stream") else words(text)
        usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": out,
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + out}
        message = {"id": self._id("msg_stub"), "type": "message", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": "".join(deltas).strip() if body.get("stream") else text, "annotations": []}]}

        def response(status: str, done: bool) -> Json:
            return {"id": ident, "object": "response", "created_at": 1767225600, "status": status, "model": model,
                    "output": [message] if done else [], "usage": usage if done else None, "error": None,
                    "incomplete_details": None, "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}

        if not body.get("stream"):
            return Answer(200, b"application/json", [json.dumps(response("completed", True)).encode()])
        seq = count()

        def ev(kind: str, data: Json) -> bytes:
            data = {"type": kind, "sequence_number": next(seq), **data}
            return b"event: " + kind.encode() + b"\ndata: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

        chunks = [ev("response.created", {"response": response("in_progress", False)})]
        chunks += [ev("response.output_text.delta", {"item_id": message["id"], "output_index": 0, "content_index": 0, "delta": d}) for d in deltas]
        chunks.append(ev("response.completed", {"response": response("completed", True)}))
        return Answer(200, b"text/event-stream; charset=utf-8", chunks)

    # -- Anthropic -------------------------------------------------------------------------

    def _messages(self, request: Request, body: Json, _: Any) -> Answer:
        model = str(body.get("model") or "claude-sonnet-4-5")
        prompt = inputTokens(body, "messages", "system")
        headers = {b"request-id": self._id("req_stub").encode()}
        ident = self._id("msg_stub")
        if not body.get("stream"):
            return Answer(200, b"application/json", [json.dumps(self._anthropicMessage(ident, model, prompt)).encode()], headers)
        deltas = self._deltas(request, model)

        def ev(kind: str, data: Json) -> bytes:
            return b"event: " + kind.encode() + b"\ndata: " + json.dumps({"type": kind, **data}, separators=(",", ":")).encode() + b"\n\n"

        start = self._anthropicMessage(ident, model, prompt)
        start.update(content=[], stop_reason=None)
        start["usage"]["output_tokens"] = 1
        chunks = [ev("message_start", {"message": start}),
                  ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
                  ev("ping", {})]
        chunks += [ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": d}}) for d in deltas]
        chunks += [ev("content_block_stop", {"index": 0}),
                   ev("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                        "usage": {"output_tokens": len(deltas)}}),
                   ev("message_stop", {})]
        return Answer(200, b"text/event-stream; charset=utf-8", chunks, headers)

    def _anthropicMessage(self, ident: str, model: str, prompt: int) -> Json:
        text = REPLY.format(model=model)
        return {"id": ident, "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": prompt, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                          "output_tokens": words(text), "service_tier": "standard"}}

    # -- Gemini and Vertex AI ---------------------------------------------------------------

    def _gemini(self, request: Request, body: Json, model: str, method: str) -> Answer:
        prompt = inputTokens(body, "contents", "systemInstruction")
        if method == "countTokens":
            return Answer(200, b"application/json", [json.dumps({"totalTokens": prompt}).encode()])
        headers = {b"x-goog-request-id": self._id("stub").encode()}
        responseId = self._id("stubresp")

        def chunk(text: str, usage: Json | None, finish: bool) -> Json:
            candidate: Json = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
            if finish:
                candidate["finishReason"] = "STOP"
            data: Json = {"candidates": [candidate], "modelVersion": model, "responseId": responseId}
            if usage is not None:
                data["usageMetadata"] = usage
            return data

        def final(out: int) -> Json:
            return {"promptTokenCount": prompt, "candidatesTokenCount": out, "totalTokenCount": prompt + out,
                    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}]}

        if method == "generateContent":
            text = REPLY.format(model=model)
            return Answer(200, b"application/json", [json.dumps(chunk(text, final(words(text)), True)).encode()], headers)
        deltas = self._deltas(request, model)
        parts = [chunk(d, {"promptTokenCount": prompt}, False) for d in deltas[:-1]]
        parts.append(chunk(deltas[-1], final(len(deltas)), True))
        if b"alt=sse" in request.uri.split(b"?", 1)[-1]:
            chunks = [b"data: " + json.dumps(p).encode() + b"\r\n\r\n" for p in parts]
            return Answer(200, b"text/event-stream", chunks, headers)
        pieces = [json.dumps(p, indent=2).encode() for p in parts]
        chunks = [b"[" + pieces[0]] + [b",\r\n" + p for p in pieces[1:]] + [b"]"]
        return Answer(200, b"application/json; charset=UTF-8", chunks, headers)

    # -- Bedrock -------------------------------------------------------------------------

    def _bedrock(self, request: Request, body: Json, modelId: str, action: str) -> Answer:
        headers = {b"x-amzn-requestid": self._id("00000000-stub-").encode()}
        text = REPLY.format(model=modelId)
        if action in ("converse", "converse-stream"):
            prompt = inputTokens(body, "messages", "system")
            if action == "converse":
                out = words(text)
                return Answer(200, b"application/json", [json.dumps({
                    "output": {"message": {"role": "assistant", "content": [{"text": text}]}}, "stopReason": "end_turn",
                    "usage": {"inputTokens": prompt, "outputTokens": out, "totalTokens": prompt + out},
                    "metrics": {"latencyMs": 1}}).encode()], headers)
            deltas = self._deltas(request, modelId)
            dumps = lambda d: json.dumps(d, separators=(",", ":")).encode()  # noqa: E731
            chunks = [eventstream.event("messageStart", dumps({"role": "assistant"}))]
            chunks += [eventstream.event("contentBlockDelta", dumps({"contentBlockIndex": 0, "delta": {"text": d}})) for d in deltas]
            chunks += [eventstream.event("contentBlockStop", dumps({"contentBlockIndex": 0})),
                       eventstream.event("messageStop", dumps({"stopReason": "end_turn"})),
                       eventstream.event("metadata", dumps({"usage": {"inputTokens": prompt, "outputTokens": len(deltas), "totalTokens": prompt + len(deltas)},
                                                            "metrics": {"latencyMs": 1}}))]
            return Answer(200, b"application/vnd.amazon.eventstream", chunks, headers)
        anthropic = "anthropic." in modelId
        prompt = inputTokens(body, "messages", "system") if anthropic else inputTokens(body, "inputText", "prompt")
        if action == "invoke":
            out = words(text)
            headers.update({b"x-amzn-bedrock-input-token-count": str(prompt).encode(),
                            b"x-amzn-bedrock-output-token-count": str(out).encode(),
                            b"x-amzn-bedrock-invocation-latency": b"1"})
            if anthropic:
                payload: Json = self._anthropicMessage(self._id("msg_bdrk_stub"), modelId, prompt)
            else:
                payload = {"inputTextTokenCount": prompt, "results": [{"tokenCount": out, "outputText": text, "completionReason": "FINISH"}]}
            return Answer(200, b"application/json", [json.dumps(payload).encode()], headers)
        deltas = self._deltas(request, modelId)
        events: list[Json] = []
        if anthropic:
            start = self._anthropicMessage(self._id("msg_bdrk_stub"), modelId, prompt)
            start.update(content=[], stop_reason=None)
            start["usage"]["output_tokens"] = 1
            events.append({"type": "message_start", "message": start})
            events += [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": d}} for d in deltas]
            events.append({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": len(deltas)}})
            events.append({"type": "message_stop"})
        else:
            events += [{"outputText": d, "index": 0} for d in deltas]
        events[-1]["amazon-bedrock-invocationMetrics"] = {"inputTokenCount": prompt, "outputTokenCount": len(deltas),
                                                          "invocationLatency": 1, "firstByteLatency": 1}
        chunks = [eventstream.event("chunk", json.dumps({"bytes": base64.b64encode(json.dumps(e).encode()).decode()}).encode())
                  for e in events]
        return Answer(200, b"application/vnd.amazon.eventstream", chunks, headers)


def _header(request: Request, name: bytes, default: int, maximum: int) -> int:
    value = request.getHeader(name)
    if value is None:
        return default
    try:
        return max(1 if name.endswith(b"events") else 0, min(int(value), maximum))
    except ValueError:
        return default


def makeStubResource(clock: IReactorTime) -> StubResource:
    """The stub upstream's root resource; C{clock} paces streams."""
    return StubResource(clock)


class Options(usage.Options):
    synopsis = "[--listen ENDPOINT]"
    optParameters = [["listen", "l", "tcp:8081:interface=127.0.0.1", "A Twisted server endpoint string."]]


def serve(reactor: Any, listen: str) -> Deferred[None]:
    """
    Serve the stub upstream on C{listen} with C{reactor} until the reactor
    stops. Fails with C{SystemExit(2)} for an endpoint Twisted cannot parse
    and C{SystemExit(1)} for one it cannot listen on, each after one line.
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.web.server import Site

    site = Site(makeStubResource(reactor), reactor=reactor)
    site.noisy = False
    try:
        endpoint = serverFromString(reactor, listen)
    except ValueError as e:
        sys.stderr.write(f"lmgate stub: --listen: {e}\n")
        raise SystemExit(2) from None

    def listening(port: Any) -> Deferred[None]:
        sys.stdout.write(f"lmgate stub: serving the providers' endpoints on {listen}\n")
        sys.stdout.flush()
        return Deferred()  # never fires: the stub serves until interrupted

    def cannotListen(reason: Any) -> None:
        sys.stderr.write(f"lmgate stub: cannot listen on {listen}: {reason.getErrorMessage()}\n")
        raise SystemExit(1)

    d: Deferred[Any] = endpoint.listen(site)
    d.addCallbacks(listening, cannotListen)
    return d


def main(argv: list[str]) -> int:
    """C{lmgate stub}: serve the stub upstream until interrupted (exits through C{SystemExit})."""
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        sys.stderr.write(f"lmgate stub: {e}\n{options}")
        return 2
    react(serve, (options["listen"],))  # runs the reactor it passes to serve; exits with serve's status
