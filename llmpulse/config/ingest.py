"""Config section `ingest`: the HTTP endpoint that takes calls and feedback from any language.

The bearer token is a secret, so it is not a key here: set LLMPULSE_SECRET_INGEST_TOKEN
and every request must carry `Authorization: Bearer <token>`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from llmpulse.config.base import Section


class IngestConfig(Section):
    host: str = Field(default="127.0.0.1", description="address to listen on (0.0.0.0 for every interface)")
    port: Annotated[int, Field(ge=0, le=65535)] = Field(default=8091, description="0 picks a free port")
    max_body_bytes: Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)] = Field(
        default=4 * 1024 * 1024, description="larger requests get 413"
    )
    max_items: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=10_000, description="events per request; more gets 400"
    )
    delivery_timeout_s: Annotated[float, Field(gt=0, le=300)] = Field(
        default=10.0, description="how long a request waits for Kafka to acknowledge; then 503"
    )
