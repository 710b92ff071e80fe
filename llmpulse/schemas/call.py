"""CallEvent: one call to an LLM API, as seen by the proxy, the SDK or the ingest endpoint."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from llmpulse.schemas.base import (
    IdStr,
    NameStr,
    NonNegFloat,
    NonNegInt,
    ShortStr,
    UtcDatetime,
    WireModel,
    new_event_id,
    utc_now,
)

Source = Literal["proxy", "sdk", "ingest", "otlp"]
Operation = Literal["chat", "completion", "embedding", "responses", "other"]
CAPTURE_MAX_CHARS = 65536


class CallEvent(WireModel):
    """One LLM API call. Field names follow the OpenTelemetry GenAI conventions where one exists."""

    event_id: IdStr = Field(default_factory=new_event_id)
    ts: UtcDatetime = Field(default_factory=utc_now, description="UTC start of the call")
    source: Source = "sdk"
    provider: ShortStr = "unknown"
    model: NameStr = Field(description="model as requested")
    response_model: Annotated[str, Field(max_length=256)] | None = Field(
        default=None, description="model as served"
    )
    operation: Operation = "chat"
    app: ShortStr = "default"
    user: Annotated[str, Field(max_length=256)] | None = None
    api_key_hash: Annotated[str, Field(max_length=128)] | None = Field(
        default=None, description="keyed hash of the API key; never the key"
    )
    status_code: Annotated[int, Field(ge=0, le=999)] = 200
    error_type: Annotated[str, Field(max_length=64)] | None = None
    latency_ms: NonNegFloat = 0.0
    ttft_ms: NonNegFloat | None = None
    streamed: bool = False
    prompt_tokens: NonNegInt = 0
    completion_tokens: NonNegInt = 0
    total_tokens: NonNegInt | None = None
    cached_tokens: NonNegInt = 0
    reasoning_tokens: NonNegInt = 0
    tokens_estimated: bool = False
    cost_usd: NonNegFloat | None = Field(default=None, description="None when the model has no price")
    prompt: Annotated[str, Field(max_length=CAPTURE_MAX_CHARS)] | None = None
    response: Annotated[str, Field(max_length=CAPTURE_MAX_CHARS)] | None = None

    @model_validator(mode="after")
    def _fill_total(self) -> CallEvent:
        if self.total_tokens is None:
            self.total_tokens = self.prompt_tokens + self.completion_tokens
        return self

    @property
    def is_error(self) -> bool:
        return self.error_type is not None or self.status_code >= 400 or self.status_code == 0
