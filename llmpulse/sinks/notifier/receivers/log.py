"""The log receiver: one readable line per notification (logger `llmpulse.notify`);
an update of an incident says so, with the id of the incident's first line and what changed."""

from __future__ import annotations

import logging

from llmpulse.sinks.notifier.blocks import changes, plain_text
from llmpulse.sinks.notifier.grouping import Notification
from llmpulse.sinks.notifier.receivers.base import MessageRef

log = logging.getLogger("llmpulse.notify")


class LogReceiver:
    kind = "log"

    def __init__(self, name: str, dashboard_url: str) -> None:
        self.name = name
        self.dashboard_url = dashboard_url

    async def send(self, notification: Notification) -> MessageRef:
        level = logging.WARNING if notification.firing else logging.INFO
        first = notification.message_ref.get("notification_id")
        if notification.update and first:
            log.log(
                level,
                "notification %s (update of %s: %s): %s",
                notification.notification_id,
                first,
                "; ".join(changes(notification)),
                plain_text(notification, self.dashboard_url).replace("\n", " | "),
            )
            return {"notification_id": first}
        log.log(
            level,
            "notification %s: %s",
            notification.notification_id,
            plain_text(notification, self.dashboard_url).replace("\n", " | "),
        )
        return {"notification_id": notification.notification_id}

    async def close(self) -> None:
        return None
