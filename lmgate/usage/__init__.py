"""
Exact token accounting, read incrementally from the bytes of each response:
bytes in, counts out (nothing here imports twisted.web or the gateway).

A reader sees a response body as it crosses the wire (compressed when it is),
in whatever chunks the network delivered. Non-streamed JSON bodies are kept up
to C{stats.capture_limit} decoded bytes and parsed at the end; streams (SSE,
AWS event streams, Gemini's streamed JSON array) are scanned event by event,
keeping at most one event, and only the events that can carry the model, the
usage or an error are parsed: a cheap byte check skips the content deltas.

The counts are normalised (docs/records.md, "Token semantics"): a count is
None where the provider did not report it, and a reader never raises. A count
that is not a sane integer makes the whole usage C{"invalid"}; reading that
stops at a bound (decoded bytes, an event-stream frame) makes it C{"truncated"}.

The parts:
  - L{lmgate.usage.choose}: L{readerFor}, which framing and which counting rules fit a response;
  - L{lmgate.usage.framing}: the framings (JSON body, SSE, JSON array stream, AWS event stream);
  - L{lmgate.usage.openai}, L{lmgate.usage.anthropic}, L{lmgate.usage.google},
    L{lmgate.usage.bedrock}: each provider format's counting rules;
  - L{lmgate.usage.base}: the sane-count checks and the reader base;
  - L{lmgate.usage.decoding}: bounded decompression;
  - L{lmgate.usage.model}: L{requestModel}, the model a request names;
  - L{lmgate.usage.eventstream}: writing AWS event-stream frames (for the stub and tests).
"""

from lmgate.usage.base import COUNT_LIMIT, HeaderLookup
from lmgate.usage.choose import readerFor
from lmgate.usage.model import requestModel

__all__ = ["COUNT_LIMIT", "HeaderLookup", "readerFor", "requestModel"]
