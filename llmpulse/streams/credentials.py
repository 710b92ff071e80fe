"""The worker's Kafka credentials, from the same `kafka.client` settings the other clients use.

confluent-kafka (producers, sink, notifier) takes librdkafka settings as they are; Faust
needs a credentials object, and the worker's own aiokafka consumer of the source
topics (source_reader.py) aiokafka's keyword arguments. The librdkafka names are the one place users set
them: security.protocol, sasl.mechanism(s), sasl.username, sasl.password, ssl.ca.location,
ssl.certificate.location, ssl.key.location.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

from llmpulse.errors import LLMPulseError


def _protocol_and_context(client: Mapping[str, Any]) -> tuple[str, ssl.SSLContext | None]:
    protocol = str(client.get("security.protocol", "PLAINTEXT")).upper()
    if protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
        raise LLMPulseError(
            f"kafka.client: security.protocol {protocol!r} is not supported by the worker; "
            "expected PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
        )
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=client.get("ssl.ca.location"))
        cert = client.get("ssl.certificate.location")
        if cert:
            context.load_cert_chain(cert, client.get("ssl.key.location"), client.get("ssl.key.password"))
    return protocol, context


def _mechanism(client: Mapping[str, Any]) -> str:
    return str(client.get("sasl.mechanism", client.get("sasl.mechanisms", "PLAIN"))).upper()


def aiokafka_security(client: Mapping[str, Any]) -> dict[str, Any]:
    """aiokafka client keyword arguments for the librdkafka security settings."""
    protocol, context = _protocol_and_context(client)
    out: dict[str, Any] = {"security_protocol": protocol}
    if context is not None:
        out["ssl_context"] = context
    if protocol.startswith("SASL"):
        out |= {
            "sasl_mechanism": _mechanism(client),
            "sasl_plain_username": client.get("sasl.username"),
            "sasl_plain_password": client.get("sasl.password"),
        }
    return out


def faust_credentials(client: Mapping[str, Any]) -> Any:
    """A faust credentials object for the librdkafka security settings, or None (plaintext)."""
    import faust

    protocol, context = _protocol_and_context(client)
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    return faust.SASLCredentials(
        username=client.get("sasl.username"),
        password=client.get("sasl.password"),
        mechanism=_mechanism(client),
        ssl_context=context,
    )
