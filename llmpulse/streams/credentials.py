"""The worker's Kafka credentials, from the same `kafka.client` settings the other clients use.

confluent-kafka (producers, sink, notifier) takes librdkafka settings as they are; Faust
(aiokafka) needs a credentials object. The librdkafka names are the one place users set
them: security.protocol, sasl.mechanism(s), sasl.username, sasl.password, ssl.ca.location,
ssl.certificate.location, ssl.key.location.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

from llmpulse.errors import LLMPulseError


def faust_credentials(client: Mapping[str, Any]) -> Any:
    """A faust credentials object for the librdkafka security settings, or None (plaintext)."""
    import faust

    protocol = str(client.get("security.protocol", "PLAINTEXT")).upper()
    if protocol == "PLAINTEXT":
        return None
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=client.get("ssl.ca.location"))
        cert = client.get("ssl.certificate.location")
        if cert:
            context.load_cert_chain(cert, client.get("ssl.key.location"), client.get("ssl.key.password"))
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        mechanism = str(client.get("sasl.mechanism", client.get("sasl.mechanisms", "PLAIN"))).upper()
        return faust.SASLCredentials(
            username=client.get("sasl.username"),
            password=client.get("sasl.password"),
            mechanism=mechanism,
            ssl_context=context,
        )
    raise LLMPulseError(
        f"kafka.client: security.protocol {protocol!r} is not supported by the worker; "
        "expected PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
    )
