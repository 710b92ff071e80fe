"""DeadLetter: bad input kept with its reason and the original bytes."""

from __future__ import annotations

import base64
from typing import Annotated, Literal

from pydantic import Field

from llmpulse.schemas.base import IdStr, UtcDatetime, WireModel, new_event_id, utc_now


class DeadLetter(WireModel):
    dead_letter_id: IdStr = Field(default_factory=new_event_id)
    ts: UtcDatetime = Field(default_factory=utc_now)
    reason: Annotated[str, Field(max_length=4096)]
    kind: Literal["invalid", "late", "rejected"] = "invalid"
    source: Annotated[str, Field(max_length=256)] = Field(
        default="", description="topic or endpoint the input came from"
    )
    partition: int | None = None
    offset: int | None = None
    payload: str = Field(description="original bytes: UTF-8 text, or base64 when not UTF-8")
    payload_encoding: Literal["utf-8", "base64"] = "utf-8"

    @classmethod
    def for_bytes(cls, raw: bytes, reason: str, **fields: object) -> DeadLetter:
        try:
            return cls(payload=raw.decode("utf-8"), payload_encoding="utf-8", reason=reason, **fields)  # type: ignore[arg-type]
        except UnicodeDecodeError:
            return cls(
                payload=base64.b64encode(raw).decode("ascii"),
                payload_encoding="base64",
                reason=reason,
                **fields,  # type: ignore[arg-type]
            )

    def original_bytes(self) -> bytes:
        if self.payload_encoding == "base64":
            return base64.b64decode(self.payload)
        return self.payload.encode("utf-8")
