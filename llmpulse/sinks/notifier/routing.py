"""Routes: which receivers get an alert, and the group it joins there."""

from __future__ import annotations

from dataclasses import dataclass

from llmpulse.config.notify import NotifyConfig, RouteConfig
from llmpulse.schemas.alert import Alert
from llmpulse.sinks.notifier.models import pattern_match

ALL_LABELS = "..."


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    receivers: tuple[str, ...]
    severity: frozenset[str] | None
    rules: tuple[str, ...] | None
    dimensions: tuple[tuple[str, str], ...]
    continue_matching: bool
    group_by: tuple[str, ...]
    group_wait_s: float
    group_interval_s: float
    repeat_interval_s: float

    def matches(self, alert: Alert) -> bool:
        if self.severity is not None and alert.severity not in self.severity:
            return False
        if self.rules is not None and not any(pattern_match(p, alert.rule) for p in self.rules):
            return False
        for key, pattern in self.dimensions:
            value = alert.dimensions.get(key)
            if value is None or not pattern_match(pattern, value):
                return False
        return True

    def group_labels(self, alert: Alert) -> dict[str, str]:
        """The values of `group_by` for this alert (missing dimensions read as '')."""
        if ALL_LABELS in self.group_by:
            return {"fingerprint": alert.fingerprint}
        out: dict[str, str] = {}
        for label in self.group_by:
            if label == "rule":
                out[label] = alert.rule
            elif label == "metric":
                out[label] = alert.metric
            elif label == "severity":
                out[label] = alert.severity
            else:
                out[label] = alert.dimensions.get(label, "")
        return out


def group_key_of(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels)) or "*"


def _route(cfg: RouteConfig, index: int, notify: NotifyConfig) -> Route:
    return Route(
        name=cfg.name or f"route{index}",
        receivers=tuple(dict.fromkeys(cfg.receivers)),
        severity=frozenset(cfg.severity) if cfg.severity is not None else None,
        rules=tuple(cfg.rules) if cfg.rules is not None else None,
        dimensions=tuple(sorted(cfg.dimensions.items())),
        continue_matching=cfg.continue_matching,
        group_by=tuple(cfg.group_by if cfg.group_by is not None else notify.group_by),
        group_wait_s=cfg.group_wait_s or notify.group_wait_s,
        group_interval_s=cfg.group_interval_s or notify.group_interval_s,
        repeat_interval_s=cfg.repeat_interval_s or notify.repeat_interval_s,
    )


class Router:
    """Routes in order; the first match wins unless it says `continue_matching`.

    Alerts no route takes go to the default route (`default_receivers`).
    """

    def __init__(self, cfg: NotifyConfig) -> None:
        self.routes = [_route(r, i, cfg) for i, r in enumerate(cfg.routes)]
        self.default = Route(
            name="default",
            receivers=tuple(dict.fromkeys(cfg.default_receivers)),
            severity=None,
            rules=None,
            dimensions=(),
            continue_matching=False,
            group_by=tuple(cfg.group_by),
            group_wait_s=cfg.group_wait_s,
            group_interval_s=cfg.group_interval_s,
            repeat_interval_s=cfg.repeat_interval_s,
        )
        self.by_name = {r.name: r for r in [*self.routes, self.default]}
        if len(self.by_name) != len(self.routes) + 1:
            raise ValueError("route names must be unique (and not 'default')")

    def match(self, alert: Alert) -> list[Route]:
        out: list[Route] = []
        for route in self.routes:
            if route.matches(alert):
                out.append(route)
                if not route.continue_matching:
                    return out
        return out or ([self.default] if self.default.receivers else [])
