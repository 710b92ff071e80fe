"""Feedback: a judgement of one call (intent correct, relevance 0-5), sent after the fact."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from llmpulse.schemas.base import IdStr, ShortStr, UtcDatetime, WireModel, new_event_id, utc_now


class Feedback(WireModel):
    event_id: IdStr = Field(default_factory=new_event_id, description="id of this feedback")
    call_event_id: IdStr = Field(description="event_id of the call judged")
    ts: UtcDatetime = Field(default_factory=utc_now)
    intent_correct: bool | None = None
    relevance: Annotated[float, Field(ge=0, le=5, allow_inf_nan=False)] | None = None
    model: Annotated[str, Field(max_length=256)] | None = None
    app: ShortStr = "default"
    user: Annotated[str, Field(max_length=256)] | None = None
    comment: Annotated[str, Field(max_length=4096)] | None = None

    @model_validator(mode="after")
    def _has_judgement(self) -> Feedback:
        if self.intent_correct is None and self.relevance is None:
            raise ValueError("feedback needs intent_correct or relevance")
        return self
