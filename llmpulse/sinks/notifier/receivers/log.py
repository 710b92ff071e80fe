"""The log receiver: one readable line per notification (logger `llmpulse.notify`)."""

from __future__ import annotations

import logging

from llmpulse.sinks.notifier.blocks import plain_text
from llmpulse.sinks.notifier.grouping import Notification

log = logging.getLogger("llmpulse.notify")


class LogReceiver:
    kind = "log"

    def __init__(self, name: str, dashboard_url: str) -> None:
        self.name = name
        self.dashboard_url = dashboard_url

    async def send(self, notification: Notification) -> None:
        level = logging.WARNING if notification.firing else logging.INFO
        log.log(
            level,
            "notification %s: %s",
            notification.notification_id,
            plain_text(notification, self.dashboard_url).replace("\n", " | "),
        )

    async def close(self) -> None:
        return None
