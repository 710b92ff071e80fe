"""The stream worker: event-time windows, dimensions and their closing."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from llmpulse.config.base import Section

CALL_DIMENSIONS = ("model", "provider", "app", "user", "api_key_hash", "operation")
# how long (event time) the finalizer keeps a published window to publish it again with a
# higher revision when a late partial changes it (llmpulse.streams.finalizing.RETAIN_MS)
FINALIZED_RETENTION_S = 900.0


class WorkerConfig(Section):
    windows_s: Annotated[list[Annotated[int, Field(gt=0, le=86400)]], Field(min_length=1)] = [10, 60]
    grace_s: Annotated[float, Field(ge=0, le=3600)] = 5.0
    idle_close_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=30.0,
        description="close windows by wall-clock idleness after this long without events, and declare a "
        "partition that has had no event since its assignment empty after this long at its end (until then "
        "no window is final without it); keep it above the longest consumer-group rebalance",
    )
    dimensions: list[list[str]] = Field(
        default_factory=lambda: [[], ["model"], ["provider"], ["app"], ["user"], ["api_key_hash"]],
        description="dimension sets of call windows of every size not listed in window_dimensions; [] is the global set",
    )
    window_dimensions: dict[int, list[list[str]]] | None = Field(
        default=None,
        description="dimension sets of call windows per window size, instead of `dimensions` (sizes not listed "
        "use `dimensions`); default: the smallest window has the global set and model only (the live charts). "
        "Every size also gets the sets its rules judge (`by:`), the smallest the llm_metrics labels",
    )
    dedup_horizon_s: Annotated[float, Field(ge=0, le=86400)] = Field(
        default=900.0,
        description="how long (event time) after a window closed a copy of one of its events (same event_id, "
        "resent by a producer) is still recognised and dropped; at least allowed_lateness_s",
    )
    allowed_lateness_s: Annotated[float, Field(ge=0, le=FINALIZED_RETENTION_S)] = Field(
        default=FINALIZED_RETENTION_S,
        description="an event arriving after its window closed, less than this long (event time) after the window "
        "closed, is counted in a new revision of the window; older ones go to the dead-letter topic as late",
    )
    max_source_skew_s: Annotated[float, Field(ge=0, le=86400)] = Field(
        default=60.0,
        description="while a source partition has a backlog, read no other partition of its kind more than this "
        "far ahead of it in event time (a replay or backfill: the finalizer holds every window between the "
        "slowest and the fastest partition); 0: off",
    )
    batch_max_messages: Annotated[int, Field(ge=1)] = 2000
    batch_within_s: Annotated[float, Field(gt=0)] = 0.2
    flush_open_windows_on_exit: bool = Field(
        default=False,
        description="close open windows on a clean stop (set by `up`: the embedded broker keeps no state)",
    )
    web_host: str = Field(default="127.0.0.1", description="address of /metrics (0.0.0.0 in containers)")
    web_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=0, description="serve Prometheus /metrics on this port (0: off)"
    )

    @model_validator(mode="after")
    def _lateness_within_dedup_horizon(self) -> WorkerConfig:
        if self.allowed_lateness_s > self.dedup_horizon_s:
            raise ValueError(
                f"allowed_lateness_s ({self.allowed_lateness_s:g}) must not exceed dedup_horizon_s "
                f"({self.dedup_horizon_s:g}): copies of late events would be counted twice; raise "
                "dedup_horizon_s or lower allowed_lateness_s"
            )
        return self

    @field_validator("dimensions")
    @classmethod
    def _known_dimensions(cls, v: list[list[str]]) -> list[list[str]]:
        _check_dimension_sets(v)
        return v

    @model_validator(mode="after")
    def _window_dimensions_of_known_windows(self) -> WorkerConfig:
        for size, sets in (self.window_dimensions or {}).items():
            if size not in self.windows_s:
                raise ValueError(
                    f"window_dimensions: {size} is not a window size of windows_s ({self.windows_s})"
                )
            _check_dimension_sets(sets, f"window_dimensions.{size}: ")
        return self

    def dimensions_by_window(self) -> dict[int, list[list[str]]]:
        """The call dimension sets of each window size (before the rules' and metrics' own)."""
        smallest = min(self.windows_s)
        given = self.window_dimensions
        if given is None:
            given = {smallest: [[], ["model"]]} if len(set(self.windows_s)) > 1 else {}
        return {s: [list(d) for d in given.get(s, self.dimensions)] for s in sorted(set(self.windows_s))}


def _check_dimension_sets(sets: list[list[str]], where: str = "") -> None:
    for dims in sets:
        for d in dims:
            if d not in CALL_DIMENSIONS:
                raise ValueError(f"{where}unknown dimension {d!r}; expected one of {', '.join(CALL_DIMENSIONS)}")
