"""The worker's Faust credentials come from the same librdkafka settings as every other client."""

from __future__ import annotations

import faust
import pytest

from llmpulse.errors import LLMPulseError
from llmpulse.streams.credentials import faust_credentials


def test_plaintext_needs_no_credentials() -> None:
    assert faust_credentials({}) is None


def test_sasl_settings_map_to_faust() -> None:
    c = faust_credentials({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512",
                           "sasl.username": "u", "sasl.password": "p"})  # fmt: skip
    assert isinstance(c, faust.SASLCredentials)
    assert (c.username, c.password, str(c.mechanism.value)) == ("u", "p", "SCRAM-SHA-512")


def test_unknown_protocol_is_a_clear_error() -> None:
    with pytest.raises(LLMPulseError, match=r"security\.protocol 'KERBEROS_MAGIC'"):
        faust_credentials({"security.protocol": "kerberos_magic"})


def test_sasl_password_comes_from_the_secret_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmpulse.config.kafka import KafkaConfig
    from llmpulse.kafka.topics import SASL_PASSWORD_ENV, client_security

    cfg = KafkaConfig(client={"security.protocol": "SASL_SSL", "sasl.username": "svc"})
    monkeypatch.delenv(SASL_PASSWORD_ENV, raising=False)
    assert "sasl.password" not in client_security(cfg)
    monkeypatch.setenv(SASL_PASSWORD_ENV, "s3cret")
    got = client_security(cfg)
    assert got["sasl.password"] == "s3cret" and got["sasl.username"] == "svc"
    assert "sasl.password" not in cfg.client  # the config object never holds it


def test_the_same_settings_map_to_aiokafka_for_the_source_reader() -> None:
    from llmpulse.streams.credentials import aiokafka_security

    assert aiokafka_security({}) == {"security_protocol": "PLAINTEXT"}
    got = aiokafka_security({"security.protocol": "sasl_plaintext", "sasl.mechanisms": "SCRAM-SHA-256",
                             "sasl.username": "u", "sasl.password": "p"})  # fmt: skip
    assert got == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-256",
                   "sasl_plain_username": "u", "sasl_plain_password": "p"}  # fmt: skip
    with pytest.raises(LLMPulseError, match=r"security\.protocol 'KERBEROS_MAGIC'"):
        aiokafka_security({"security.protocol": "kerberos_magic"})
