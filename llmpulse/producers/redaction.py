"""Prompt / response capture: off by default; when on, redacted then truncated.

Redacted (replaced by a marker such as ``[REDACTED_EMAIL]``): API-key-like strings
(OpenAI/Anthropic ``sk-...``, AWS ``AKIA...``, Google ``AIza...``, GitHub, Slack,
``Bearer ...`` tokens, JWTs, and long letter+digit tokens), e-mail addresses,
payment card numbers (13-19 digits passing the Luhn check) and phone numbers
(7-15 digits, with optional +country code, separators and parentheses).

Light module (stdlib only): the in-app SDK imports it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

KEY = "[REDACTED_KEY]"
EMAIL = "[REDACTED_EMAIL]"
CARD = "[REDACTED_CARD]"
PHONE = "[REDACTED_PHONE]"
CUSTOM = "[REDACTED]"
TRUNCATED = "…[truncated]"

_KEY_RX = re.compile(
    r"""
    (?:\bBearer\s+[A-Za-z0-9._~+/=\-]{8,})
    | (?:\b(?:sk|pk|rk)-[A-Za-z0-9_\-]{16,})
    | (?:\bAKIA[0-9A-Z]{16}\b)
    | (?:\bAIza[0-9A-Za-z_\-]{30,})
    | (?:\bgh[pousr]_[A-Za-z0-9]{30,})
    | (?:\bxox[abprs]-[A-Za-z0-9\-]{10,})
    | (?:\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,})
    | (?:\b(?=[A-Za-z0-9_\-]*[0-9])(?=[A-Za-z0-9_\-]*[A-Za-z])[A-Za-z0-9_\-]{32,})
    """,
    re.VERBOSE,
)
_EMAIL_RX = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
_CARD_RX = re.compile(r"(?<![\d\-])\d(?:[ \-]?\d){12,18}(?![\d\-])")
_PHONE_RX = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.\-]?)?(?:\(\d{1,4}\)[\s.\-]?)?\d[\d\s.\-]{4,16}\d(?![\w])")
_DATE_RX = re.compile(r"\d{4}-\d{2}-\d{2}|\d{1,2}[./\-]\d{1,2}[./\-]\d{2,4}")
_IPV4_RX = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card(m: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", m.group(0))
    return CARD if 13 <= len(digits) <= 19 and _luhn(digits) else m.group(0)


def _phone(m: re.Match[str]) -> str:
    text = m.group(0)
    stripped = text.strip()
    if _DATE_RX.fullmatch(stripped) or _IPV4_RX.fullmatch(stripped):
        return text
    n = sum(c.isdigit() for c in text)
    return PHONE if 7 <= n <= 15 else text


class Redactor:
    """Replaces secrets and personal data in text; `extra_patterns` become `[REDACTED]`."""

    def __init__(self, extra_patterns: Iterable[str] = ()) -> None:
        self._extra = [re.compile(p) for p in extra_patterns]

    def redact(self, text: str) -> str:
        for rx in self._extra:
            text = rx.sub(CUSTOM, text)
        text = _KEY_RX.sub(KEY, text)
        text = _EMAIL_RX.sub(EMAIL, text)
        text = _CARD_RX.sub(_card, text)
        return _PHONE_RX.sub(_phone, text)

    def capture(self, text: str | None, max_chars: int) -> str | None:
        """Redacted text cut to at most `max_chars` characters (None stays None).

        Very long input is cut before redaction (to bound the cost); the cut's last
        word is then dropped so that a secret split at the cut never leaks in part.
        """
        if text is None:
            return None
        limit = max(max_chars * 4, max_chars + 4096)
        precut = len(text) > limit
        if precut:
            text = text[:limit]
            text = text[: max(0, text.rfind(" "))] if " " in text else ""
        out = self.redact(text)
        if len(out) <= max_chars and not precut:
            return out
        keep = max(0, max_chars - len(TRUNCATED))
        return out[:keep] + TRUNCATED if max_chars > len(TRUNCATED) else out[:max_chars]


_default = Redactor()


def redact(text: str) -> str:
    """`text` with emails, phone numbers, API-key-like strings and card numbers replaced."""
    return _default.redact(text)


def capture_text(text: str | None, max_chars: int, redactor: Redactor | None = None) -> str | None:
    """Redact, then truncate to `max_chars`: what may go into a CallEvent's prompt/response."""
    return (redactor or _default).capture(text, max_chars)
