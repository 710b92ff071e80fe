"""Pydantic models of every event, aggregate and alert: the only wire format."""

from llmpulse.schemas.action import ActionEvent
from llmpulse.schemas.aggregate import WindowAggregate, aggregate_id, dimensions_key
from llmpulse.schemas.alert import Alert, alert_fingerprint
from llmpulse.schemas.base import SCHEMA_VERSION
from llmpulse.schemas.call import CallEvent
from llmpulse.schemas.codec import Decoded, Rejected, decode, decode_one, encode, encode_batch
from llmpulse.schemas.deadletter import DeadLetter
from llmpulse.schemas.feedback import Feedback
from llmpulse.schemas.gpu import GpuProcess, GpuSample
from llmpulse.schemas.host import HostSample

__all__ = [
    "SCHEMA_VERSION",
    "ActionEvent",
    "Alert",
    "CallEvent",
    "DeadLetter",
    "Decoded",
    "Feedback",
    "GpuProcess",
    "GpuSample",
    "HostSample",
    "Rejected",
    "WindowAggregate",
    "aggregate_id",
    "alert_fingerprint",
    "decode",
    "decode_one",
    "dimensions_key",
    "encode",
    "encode_batch",
]
