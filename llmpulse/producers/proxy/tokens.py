"""Token usage: read it from a response's `usage`, or estimate it when there is none.

Usage shapes understood: chat/completions/embeddings (``prompt_tokens``,
``completion_tokens``, ``prompt_tokens_details.cached_tokens``,
``completion_tokens_details.reasoning_tokens``), responses (``input_tokens``,
``output_tokens``, ``input_tokens_details.cached_tokens``,
``output_tokens_details.reasoning_tokens``) and Anthropic Messages (``input_tokens``,
``output_tokens``, ``cache_read_input_tokens``, ``cache_creation_input_tokens``,
``cache_creation.ephemeral_1h_input_tokens``, ``output_tokens_details.thinking_tokens``).
Anthropic's ``input_tokens`` leaves out the cache reads and writes; `Usage.prompt_tokens`
puts them back, so that prompt tokens mean every input token, whatever the provider
(``cached_tokens`` and ``cache_write_tokens`` are parts of it).

The estimate is the common heuristic of one token per four characters of text (plus
a few tokens of framing per chat message); calls that carry it set
``tokens_estimated``. Stdlib only: the in-app SDK imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 3


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int | None = None
    estimated: bool = False
    cache_write_tokens: int = 0  # part of prompt_tokens written to the prompt cache
    cache_write_1h_tokens: int = 0  # part of cache_write_tokens written to the 1-hour cache


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def anthropic_usage(obj: dict[str, Any]) -> Usage:
    """A `Usage` from an Anthropic Messages `usage` object (cache reads and writes added
    into prompt_tokens; see the module docstring)."""
    uncached, output = _int(obj.get("input_tokens")), _int(obj.get("output_tokens"))
    read, written = _int(obj.get("cache_read_input_tokens")), _int(obj.get("cache_creation_input_tokens"))
    by_ttl = obj.get("cache_creation")
    written_1h = min(written, _int(by_ttl.get("ephemeral_1h_input_tokens"))) if isinstance(by_ttl, dict) else 0
    od = obj.get("output_tokens_details")
    thinking = min(output, _int(od.get("thinking_tokens"))) if isinstance(od, dict) else 0
    prompt = uncached + read + written
    return Usage(
        prompt, output, read, thinking, prompt + output,
        cache_write_tokens=written, cache_write_1h_tokens=written_1h,
    )


def usage_from(obj: Any) -> Usage | None:
    """A `Usage` from a response's `usage` object (any of the API shapes), or None."""
    if not isinstance(obj, dict):
        return None
    if "prompt_tokens" in obj or "completion_tokens" in obj:
        # OpenAI's shape first: gateways (LiteLLM) add Anthropic's cache_* keys beside it
        prompt, completion = _int(obj.get("prompt_tokens")), _int(obj.get("completion_tokens"))
        pd, cd = obj.get("prompt_tokens_details"), obj.get("completion_tokens_details")
    elif "cache_read_input_tokens" in obj or "cache_creation_input_tokens" in obj:
        return anthropic_usage(obj)
    elif "input_tokens" in obj or "output_tokens" in obj:
        prompt, completion = _int(obj.get("input_tokens")), _int(obj.get("output_tokens"))
        pd, cd = obj.get("input_tokens_details"), obj.get("output_tokens_details")
    else:
        return None
    cached = _int(pd.get("cached_tokens")) if isinstance(pd, dict) else 0
    reasoning = _int(cd.get("reasoning_tokens")) if isinstance(cd, dict) else 0
    total = obj.get("total_tokens")
    return Usage(prompt, completion, cached, reasoning, _int(total) if total is not None else None)


def estimate_tokens(text: str) -> int:
    """Tokens in `text` by the 4-characters-per-token rule (0 for empty text)."""
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN if text else 0


def texts_of(value: Any) -> list[str]:
    """Every piece of text in a prompt/message/content structure."""
    if isinstance(value, str):
        return [value]
    out: list[str] = []
    if isinstance(value, list):
        for item in value:
            out.extend(texts_of(item))
    elif isinstance(value, dict):
        for k in ("content", "text", "input", "arguments", "output"):
            if k in value:
                out.extend(texts_of(value[k]))
        calls = value.get("tool_calls")
        if isinstance(calls, list):
            for c in calls:
                if isinstance(c, dict):
                    out.extend(texts_of(c.get("function")))
    return out


def request_text(body: dict[str, Any]) -> str:
    """The prompt text of a request body (chat messages, prompt, input, instructions, and
    Anthropic's top-level system prompt)."""
    parts: list[str] = []
    for k in ("instructions", "system", "messages", "prompt", "input"):
        if k in body:
            parts.extend(texts_of(body[k]))
    return "\n".join(parts)


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """Estimated prompt tokens of a chat/completion/embedding/responses request body."""
    n = estimate_tokens(request_text(body))
    messages = body.get("messages")
    if isinstance(messages, list):
        n += TOKENS_PER_MESSAGE * len(messages) + TOKENS_PER_MESSAGE
    return n


def response_text(body: dict[str, Any]) -> str:
    """The generated text of a non-streamed response (chat, completion or responses)."""
    parts: list[str] = []
    choices = body.get("choices")
    if isinstance(choices, list):
        for c in choices:
            if isinstance(c, dict):
                if "message" in c:
                    parts.extend(texts_of(c["message"]))
                elif isinstance(c.get("text"), str):
                    parts.append(c["text"])
    output = body.get("output")
    if isinstance(output, list):
        parts.extend(texts_of(output))
    if body.get("type") == "message":  # Anthropic Messages: content blocks
        parts.extend(texts_of(body.get("content")))
    return "".join(parts)


_ANTHROPIC_DELTA_TEXT = ("text", "partial_json", "thinking")


def delta_text(chunk: dict[str, Any]) -> str:
    """The text a stream chunk adds (chat delta, completion text, responses delta, or an
    Anthropic content_block_delta: text, tool input JSON or thinking)."""
    ctype = chunk.get("type")
    if ctype == "response.output_text.delta":
        d = chunk.get("delta")
        return d if isinstance(d, str) else ""
    if ctype == "content_block_delta":
        d = chunk.get("delta")
        if isinstance(d, dict):
            for k in _ANTHROPIC_DELTA_TEXT:
                v = d.get(k)
                if isinstance(v, str):
                    return v
        return ""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return ""
    parts: list[str] = []
    for c in choices:
        if isinstance(c, dict):
            delta = c.get("delta")
            if isinstance(delta, dict):
                parts.extend(texts_of(delta))
            elif isinstance(c.get("text"), str):
                parts.append(c["text"])
    return "".join(parts)


def estimate_usage(request_body: dict[str, Any] | None, completion: str) -> Usage:
    """Estimated usage of a call from its request body and generated text."""
    prompt = estimate_prompt_tokens(request_body) if request_body else 0
    return Usage(prompt, estimate_tokens(completion), estimated=True)
