"""Config section `dashboard`: the web dashboard and its HTTP API (`llmpulse dashboard`).

The bearer token is a secret, so it is not a key here: set LLMPULSE_SECRET_DASHBOARD_TOKEN
and every request must carry `Authorization: Bearer <token>` (a browser opens
`/?token=<token>` once and gets a cookie). Without the token the dashboard serves loopback
only: a `host` other than 127.0.0.0/8, ::1 or localhost stops it at start
(`llmpulse.analysis.api.DashboardServer`), since anyone reaching the port would read every call.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from llmpulse.config.base import Section

TOKEN_ENV = "LLMPULSE_SECRET_DASHBOARD_TOKEN"


class DashboardConfig(Section):
    host: str = Field(
        default="127.0.0.1",
        description="address to listen on (0.0.0.0 for every interface: then LLMPULSE_SECRET_DASHBOARD_TOKEN is required)",
    )
    port: Annotated[int, Field(ge=0, le=65535)] = Field(default=8080, description="0 picks a free port")
    query_max_rows: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=5_000, description="row limit of /api/query (and of clickhouse.query_max_rows, whichever is lower)"
    )
    query_max_seconds: Annotated[float, Field(gt=0, le=600)] = Field(
        default=10.0, description="time limit of one query (and of clickhouse.query_max_seconds)"
    )
    max_range_days: Annotated[float, Field(gt=0, le=3660)] = Field(
        default=31.0, description="the widest time range a panel may ask for"
    )
    max_points: Annotated[int, Field(ge=10, le=10_000)] = Field(
        default=240, description="points per series in the charts (the bucket grows with the range)"
    )
    max_series: Annotated[int, Field(ge=1, le=50)] = Field(
        default=8, description="series per chart: the busiest groups of the range"
    )
    aggregate_window_s: Annotated[int, Field(gt=0)] = Field(
        default=60, description="the worker window read from llm_aggregates for buckets at least this wide"
    )
    refresh_s: Annotated[float, Field(ge=0, le=3600)] = Field(
        default=30.0, description="default auto-refresh interval of the page (0 = off)"
    )
    calls_page_rows: Annotated[int, Field(ge=1, le=1000)] = Field(default=100, description="rows per call-log page")
