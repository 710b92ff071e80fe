"""OTLP/HTTP trace requests and responses on the wire: protobuf and OTLP JSON, one decoded form.

The failure it defends against: a body that is not a trace export (wrong encoding, JSON
that protobuf's JSON mapping would misread, a nesting or size bomb) either raising out of
the handler as a 500 or being half-read. `decode_request` returns the parsed
`ExportTraceServiceRequest` or raises `BadPayload` with the reason to send back (400)
and to keep in the dead letter. OTLP JSON differs from protobuf's own JSON mapping in
one place that matters: trace and span ids are hex, not base64; they are converted
before parsing, and a malformed id names its place. int64s may be strings or numbers,
enums integers, keys lowerCamelCase or the proto field names (protobuf accepts both).

Responses use the request's encoding, as the OTLP spec asks: `ExportTraceServiceResponse`
(with `partial_success` when spans were rejected) on success, `google.rpc.Status` on
failure. The Status message has two scalar fields; it is written by hand so that the
server does not need googleapis-common-protos.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from llmpulse.schemas.nesting import InputTooComplex, loads_json

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
CONTENT_TYPES = (PROTOBUF, JSON)

# google.rpc.Code values used here.
INVALID_ARGUMENT = 3
UNAVAILABLE = 14
UNAUTHENTICATED = 16

# Id fields of spans and links, and their sizes in bytes.
_ID_BYTES = {"traceId": 16, "trace_id": 16, "spanId": 8, "span_id": 8, "parentSpanId": 8, "parent_span_id": 8}


class BadPayload(ValueError):
    """A request body that is not a trace export; the message is the reason."""


def decode_request(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    """The request in `body`, or BadPayload with the reason."""
    if content_type == PROTOBUF:
        try:
            parsed: ExportTraceServiceRequest = ExportTraceServiceRequest.FromString(body)
            return parsed
        except (DecodeError, RecursionError) as exc:  # upb bounds nesting at 100 and says so here
            raise BadPayload(f"not an OTLP protobuf ExportTraceServiceRequest: {exc}") from None
    try:
        doc = loads_json(body)
    except InputTooComplex as exc:
        raise BadPayload(f"JSON {exc}") from None
    except ValueError as exc:
        raise BadPayload(f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadPayload(f"an OTLP JSON export must be a JSON object, got {type(doc).__name__}")
    _hex_ids_to_base64(doc)
    req = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(doc, req, ignore_unknown_fields=True)
    except (json_format.ParseError, TypeError, ValueError, RecursionError) as exc:
        raise BadPayload(f"not an OTLP JSON ExportTraceServiceRequest: {exc}") from None
    return req


def _hex_ids_to_base64(doc: dict[str, Any]) -> None:
    """Rewrite OTLP JSON's hex ids in place as base64, which protobuf's JSON parser reads."""
    for ri, rs in _dicts(doc, "resourceSpans", "resource_spans"):
        for si, ss in _dicts(rs, "scopeSpans", "scope_spans"):
            for pi, span in _dicts(ss, "spans"):
                where = f"resourceSpans[{ri}].scopeSpans[{si}].spans[{pi}]"
                _convert_ids(span, where)
                for li, link in _dicts(span, "links"):
                    _convert_ids(link, f"{where}.links[{li}]")


def _dicts(node: dict[str, Any], *keys: str) -> list[tuple[int, dict[str, Any]]]:
    for key in keys:
        items = node.get(key)
        if isinstance(items, list):
            return [(i, d) for i, d in enumerate(items) if isinstance(d, dict)]
    return []  # absent or of the wrong type: protobuf's parser reports the latter


def _convert_ids(node: dict[str, Any], where: str) -> None:
    for key, size in _ID_BYTES.items():
        value = node.get(key)
        if not isinstance(value, str) or not value:
            continue
        try:
            raw = binascii.unhexlify(value)
        except (binascii.Error, ValueError):
            raise BadPayload(f"{where}.{key}: expected {size * 2} hex digits, got {value[:40]!r}") from None
        if len(raw) != size:
            raise BadPayload(f"{where}.{key}: expected {size * 2} hex digits, got {len(value)}")
        node[key] = base64.b64encode(raw).decode("ascii")


def success(content_type: str, rejected: int = 0, message: str = "") -> bytes:
    """ExportTraceServiceResponse: empty when all was accepted, else its partial_success."""
    resp = ExportTraceServiceResponse()
    if rejected or message:
        resp.partial_success.rejected_spans = rejected
        resp.partial_success.error_message = message
    if content_type == PROTOBUF:
        wire: bytes = resp.SerializeToString()
        return wire
    return json.dumps(json_format.MessageToDict(resp), separators=(",", ":")).encode()


def failure(content_type: str, code: int, message: str) -> bytes:
    """google.rpc.Status{code, message} in the request's encoding (JSON when it is unknown)."""
    if content_type == PROTOBUF:
        text = message.encode("utf-8")
        return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text  # fields 1 (int32), 2 (string)
    return json.dumps({"code": code, "message": message}, separators=(",", ":")).encode()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def span_as_request_json(rs: Any, ss: Any, span: Any) -> bytes:
    """One span, with its resource and scope, as an OTLP JSON request (a dead letter that can be re-posted)."""
    one = ExportTraceServiceRequest()
    out_rs = one.resource_spans.add()
    out_rs.resource.CopyFrom(rs.resource)
    out_ss = out_rs.scope_spans.add()
    out_ss.scope.CopyFrom(ss.scope)
    out_ss.spans.add().CopyFrom(span)
    doc = json_format.MessageToDict(one)
    for rs_doc in doc.get("resourceSpans", []):
        for ss_doc in rs_doc.get("scopeSpans", []):
            for s in ss_doc.get("spans", []):
                _ids_to_hex(s)
                for link in s.get("links", []):
                    _ids_to_hex(link)
    return json.dumps(doc, separators=(",", ":")).encode()


def _ids_to_hex(node: dict[str, Any]) -> None:
    for key in ("traceId", "spanId", "parentSpanId"):
        if isinstance(node.get(key), str):
            node[key] = base64.b64decode(node[key]).hex()
