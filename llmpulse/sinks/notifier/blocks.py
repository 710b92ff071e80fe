"""What a notification says: Slack Block Kit, a plain-text fallback, the webhook JSON.

Each alert line says what crossed what (value against threshold or baseline, the band
a healthy value lies in), why it is not noise (the evidence: calls counted, p-value,
confidence bound, SLO burn rates and error budget left), over which window, for which
dimensions, since when, and links to the dashboard filtered to the alert: ``<dashboard_url>/?alert=<fingerprint>&from=<window_start>&to=<window_end>``
followed by one query parameter per dimension.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from llmpulse.schemas.alert import Alert, format_number
from llmpulse.sinks.notifier.grouping import Notification

MAX_ALERT_BLOCKS = 40  # Slack allows 50 blocks per message
SEVERITY_ICON = {"critical": ":red_circle:", "warning": ":large_orange_circle:", "resolved": ":white_check_mark:"}
RESERVED_PARAMS = {"alert", "from", "to"}


def _iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def dashboard_link(base_url: str, alert: Alert) -> str:
    params: list[tuple[str, str]] = [
        ("alert", alert.fingerprint),
        ("from", _iso(alert.window_start)),
        ("to", _iso(alert.window_end)),
    ]
    params.extend((k, v) for k, v in sorted(alert.dimensions.items()) if k not in RESERVED_PARAMS)
    return f"{base_url.rstrip('/')}/?{urlencode(params)}"


_num = format_number


def comparison(alert: Alert) -> str:
    """`value 0.12 vs threshold 0.05` (or vs baseline for anomalies)."""
    parts = [f"{alert.metric} *{_num(alert.value)}*"]
    if alert.threshold is not None:
        parts.append(f"threshold {_num(alert.threshold)}")
    if alert.baseline is not None:
        ratio = ""
        if alert.value is not None and alert.baseline:
            ratio = f" ({alert.value / alert.baseline:.2f}x)"
        parts.append(f"baseline {_num(alert.baseline)}{ratio}")
    text = " vs ".join(parts)
    if alert.expected_low is not None or alert.expected_high is not None:
        lo = "" if alert.expected_low is None else _num(alert.expected_low)
        hi = "" if alert.expected_high is None else _num(alert.expected_high)
        text += f" (expected {lo}..{hi})"
    return text


def _since(alert: Alert, now: datetime) -> str:
    secs = max(0, int((now - alert.started_at).total_seconds()))
    if secs < 120:
        ago = f"{secs}s"
    elif secs < 7200:
        ago = f"{secs // 60}m"
    else:
        ago = f"{secs // 3600}h{(secs % 3600) // 60:02d}m"
    return f"since {alert.started_at.strftime('%Y-%m-%d %H:%M:%S')} UTC ({ago})"


def _dims(alert: Alert) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(alert.dimensions.items())) or "all traffic"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def alert_text(alert: Alert, base_url: str, now: datetime, new: bool = False) -> str:
    state = "RESOLVED" if alert.state == "resolved" else alert.severity.upper()
    marker = " (new)" if new else ""
    window = f"{alert.window_start.strftime('%H:%M:%S')}-{alert.window_end.strftime('%H:%M:%S')} UTC"
    lines = [
        f"*<{dashboard_link(base_url, alert)}|{_escape(alert.rule)}>* `{_escape(_dims(alert))}` {state}{marker}",
        f"{comparison(alert)} · window {window} · {_since(alert, now)}",
    ]
    why = alert.why()
    if why and alert.state == "firing":
        lines.append(f"_evidence:_ {_escape(why[:400])}")
    if alert.summary:
        lines.append(_escape(alert.summary[:500]))
    if alert.root_cause:
        cause = ", ".join(f"{k}={v}" for k, v in alert.root_cause.items())
        lines.append(f"_likely cause:_ {_escape(cause[:300])}")
    from llmpulse.actions.hints import approval_lines  # issue 10: actions awaiting approval

    lines.extend(f":hourglass: {_escape(line)}" for line in approval_lines(alert))
    return "\n".join(lines)[:2900]


def changes(n: Notification) -> list[str]:
    """What an update changed, one line each: `escalated to critical: success_rate on model=gpt-4o`."""
    lines: list[str] = []
    for a in n.firing:
        if a.fingerprint in n.escalated:
            lines.append(f"escalated to {a.severity}: {a.rule} on {_dims(a)}")
        elif a.fingerprint in n.new:
            lines.append(f"joined ({a.severity}): {a.rule} on {_dims(a)}")
    lines.extend(f"resolved: {a.rule} on {_dims(a)}" for a in n.resolved)
    return lines


def thread_reply(n: Notification) -> str:
    """The short reply under an incident's Slack message that an update edited."""
    return "\n".join(_escape(line) for line in changes(n)[:MAX_ALERT_BLOCKS])[:2900] or "updated"


def headline(n: Notification) -> str:
    counts = []
    if n.firing:
        counts.append(f"{len(n.firing)} firing")
    if n.resolved:
        counts.append(f"{len(n.resolved)} resolved")
    what = ", ".join(f"{k}={v}" for k, v in sorted(n.group_labels.items())) or n.route
    return f"[{n.severity.upper()}] {' · '.join(counts)} · {what}"[:150]


def slack_message(n: Notification, base_url: str, now: datetime) -> tuple[str, list[dict[str, Any]]]:
    """(fallback text, Block Kit blocks)."""
    icon = SEVERITY_ICON[n.severity]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": headline(n), "emoji": True}},
    ]
    listed = [*n.firing, *n.resolved]
    for a in listed[:MAX_ALERT_BLOCKS]:
        text = f"{icon if a.state == 'firing' else SEVERITY_ICON['resolved']} " + alert_text(
            a, base_url, now, new=a.fingerprint in n.new and len(listed) > 1
        )
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": text}})
    if len(listed) > MAX_ALERT_BLOCKS:
        blocks.append(
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": f"...and {len(listed) - MAX_ALERT_BLOCKS} more alerts"},
            }
        )
    blocks.append(
        {
            "type": "context",
            "elements": [
                {
                    "type": "mrkdwn",
                    "text": f"llmpulse · route `{n.route}` · notification `{n.notification_id}`"
                    + (f" · updated {now.strftime('%H:%M:%S')} UTC" if n.update else ""),
                }
            ],
        }
    )
    return plain_text(n, base_url), blocks


def plain_text(n: Notification, base_url: str) -> str:
    lines = [headline(n)]
    for a in [*n.firing, *n.resolved][:MAX_ALERT_BLOCKS]:
        state = "resolved" if a.state == "resolved" else a.severity
        value = f"value {_num(a.value)}"
        if a.threshold is not None:
            value += f" vs threshold {_num(a.threshold)}"
        if a.baseline is not None:
            value += f" vs baseline {_num(a.baseline)}"
        why = a.why() if a.state == "firing" else ""
        if why:
            value += f" ({why})"
        lines.append(f"- {state} {a.rule} [{_dims(a)}] {value} {dashboard_link(base_url, a)}")
    return "\n".join(lines)[:3900]


def webhook_payload(n: Notification, base_url: str) -> dict[str, Any]:
    def one(a: Alert) -> dict[str, Any]:
        d = a.model_dump(mode="json", exclude_none=True)
        d["dashboard_url"] = dashboard_link(base_url, a)
        d["new"] = a.fingerprint in n.new
        why = a.why()
        if why:
            d["why"] = why  # expected_low/expected_high/evidence come with the alert's own fields
        return d

    out: dict[str, Any] = {
        "notification_id": n.notification_id,
        # the same for every message of one incident (its aggregation group), so a consumer
        # such as PagerDuty keys its incident on it; `update`: this changes that incident
        # (escalation, alert joined or resolved) and is not a new page
        "incident_id": n.group_id,
        "update": n.update,
        "status": "firing" if n.firing else "resolved",
        "severity": n.severity,
        "route": n.route,
        "receiver": n.receiver,
        "group_key": n.group_key,
        "group_labels": n.group_labels,
        "firing": [one(a) for a in n.firing],
        "resolved": [one(a) for a in n.resolved],
        "text": plain_text(n, base_url),
    }
    first = n.message_ref.get("notification_id")
    if first:
        out["incident_notification_id"] = first  # the incident's first message (its page)
    if n.update:
        out["changes"] = changes(n)
    return out
