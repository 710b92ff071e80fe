"""Config section `llm_metrics`: the LLM figures served to Prometheus from the worker's aggregates.

`labels` is the one dimension set the metrics are labelled by; it bounds their cardinality
(series = distinct combinations of those dimensions seen), so per-user or per-key labels are
a choice to make knowingly. The worker aggregates this set besides `worker.dimensions`, so the
worker and the dashboard must read the same section (the same config file).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from llmpulse.config.base import Section
from llmpulse.config.worker import CALL_DIMENSIONS


class LlmMetricsConfig(Section):
    enabled: bool = Field(
        default=True,
        description="the dashboard's /metrics serves gen_ai_* metrics from <prefix>aggregates (a consumer group of its own)",
    )
    labels: Annotated[list[str], Field(max_length=4)] = Field(
        default_factory=lambda: ["model", "provider", "app"],
        description="call dimensions the metrics are labelled by (some of model, provider, app, operation, user, "
        "api_key_hash); the worker aggregates this dimension set",
    )
    max_error_types: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=50, description="distinct error_type label values; later ones are counted as _OTHER"
    )

    @field_validator("labels")
    @classmethod
    def _known_labels(cls, v: list[str]) -> list[str]:
        for d in v:
            if d not in CALL_DIMENSIONS:
                raise ValueError(f"unknown dimension {d!r}; expected some of {', '.join(CALL_DIMENSIONS)}")
        if len(set(v)) != len(v):
            raise ValueError("a dimension is listed twice")
        return v
