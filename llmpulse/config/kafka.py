"""Where events travel: the embedded Tansu broker or an Apache Kafka cluster."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from llmpulse.config.base import Section

ClientValue = str | int | float | bool


class KafkaConfig(Section):
    url: str = Field(
        default="embedded",
        description="'embedded' (Tansu on loopback) or kafka://host:port[,host:port...]",
    )
    topic_prefix: Annotated[str, Field(max_length=100, pattern=r"^[A-Za-z0-9._\-]*$")] = "llmpulse."
    partitions: Annotated[int, Field(ge=1, le=1024)] = 3
    replication_factor: Annotated[int, Field(ge=1, le=16)] = 1
    session_timeout_ms: Annotated[int, Field(ge=1000, le=300_000)] = 6000
    broker_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=0, description="embedded broker port; 0 picks a free one"
    )
    client: dict[str, ClientValue] = Field(
        default_factory=dict,
        description="librdkafka settings passed through (security.protocol, sasl.*, ssl.*)",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        if v == "embedded" or v.startswith("kafka://"):
            if v.startswith("kafka://") and not v[len("kafka://") :].strip(","):
                raise ValueError("kafka:// needs at least one host:port")
            return v
        raise ValueError("expected 'embedded' or kafka://host:port[,host:port...]")

    @property
    def embedded(self) -> bool:
        return self.url == "embedded"

    def bootstrap_servers(self) -> str:
        if self.embedded:
            raise RuntimeError("the embedded broker's address is known only once it runs")
        return self.url[len("kafka://") :]

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"
