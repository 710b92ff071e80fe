"""Config section `capture`: prompt/response text in CallEvents (off by default).

When enabled, text is redacted (emails, phone numbers, API-key-like strings, card
numbers, plus `extra_patterns`) and truncated to `max_chars` before it leaves the process.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, field_validator

from llmpulse.config.base import Section
from llmpulse.schemas.call import CAPTURE_MAX_CHARS


class CaptureConfig(Section):
    enabled: bool = Field(default=False, description="record prompt and response text")
    max_chars: Annotated[int, Field(ge=1, le=CAPTURE_MAX_CHARS)] = 4096
    extra_patterns: list[str] = Field(
        default_factory=list, description="additional regular expressions to redact"
    )

    @field_validator("extra_patterns")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {p!r}: {exc}") from None
        return v
