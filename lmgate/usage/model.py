"""
The model a request names, for the record when the response did not say:
read from the request body and URL, never from the response.
"""

from __future__ import annotations

import json
import re
from urllib.parse import unquote

from lmgate.usage.base import asDict, asStr

_URL_MODEL = re.compile(rb"/models/([^/:?]+)(?::|/|$)")
_BEDROCK_MODEL = re.compile(rb"^/model/([^/]+)/")
_AZURE_DEPLOYMENT = re.compile(rb"/openai/deployments/([^/]+)/")


def requestModel(fmt: str, endpoint: bytes, body: bytes | None) -> str | None:
    """
    The model a request names: its JSON body's C{model}, else its URL (Gemini
    and Vertex C{.../models/M:method}, Bedrock C{/model/ID/...}, Azure
    C{/openai/deployments/D/...}). None when neither names one.
    """
    if body and len(body) <= 1024 * 1024 and body.lstrip()[:1] == b"{":
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        model = asStr(asDict(parsed).get("model"))
        if model is not None:
            return model
    for pattern in (_BEDROCK_MODEL, _AZURE_DEPLOYMENT, _URL_MODEL):
        match = pattern.search(endpoint)
        if match:
            return unquote(match.group(1).decode("ascii", "replace"))
    return None
