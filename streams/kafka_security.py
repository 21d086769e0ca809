"""How every Kafka client of the ledger authenticates and encrypts: settings, aiokafka kwargs, Faust."""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from sardis_ledger.streams.errors import ConfigError


class Protocol(StrEnum):
    """Kafka's security.protocol values this ledger accepts.

    SASL_PLAINTEXT is refused on purpose: it sends the SCRAM exchange and every record in clear.
    """

    PLAINTEXT = "PLAINTEXT"  # the loopback dev broker only
    SSL = "SSL"  # TLS; with a client certificate it is mutual TLS (principal from the cert)
    SASL_SSL = "SASL_SSL"  # TLS + SCRAM user and password


class Mechanism(StrEnum):
    SCRAM_SHA_512 = "SCRAM-SHA-512"
    SCRAM_SHA_256 = "SCRAM-SHA-256"


ENV_NAMES = (
    "SARDIS_KAFKA_SECURITY_PROTOCOL",
    "SARDIS_KAFKA_SASL_MECHANISM",
    "SARDIS_KAFKA_USER",
    "SARDIS_KAFKA_PASSWORD",
    "SARDIS_KAFKA_CA_FILE",
    "SARDIS_KAFKA_CERT_FILE",
    "SARDIS_KAFKA_KEY_FILE",
    "SARDIS_KAFKA_KEY_PASSWORD",
)


@dataclass(frozen=True, slots=True)
class KafkaSecurity:
    """One process's Kafka identity. PLAINTEXT (the default) is for the loopback dev broker."""

    protocol: Protocol = Protocol.PLAINTEXT
    mechanism: Mechanism = Mechanism.SCRAM_SHA_512
    user: str = ""
    password: str = field(default="", repr=False)
    # Trusted CAs for the broker's certificate; empty: the system's CAs (still verified).
    ca_file: str = ""
    cert_file: str = ""  # client certificate (mutual TLS)
    key_file: str = ""
    key_password: str = field(default="", repr=False)

    @property
    def uses_tls(self) -> bool:
        return self.protocol is not Protocol.PLAINTEXT

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for AIOKafkaProducer/Consumer/AdminClient (without the bootstrap)."""
        if not self.uses_tls:
            return {"security_protocol": Protocol.PLAINTEXT.value}
        kwargs: dict[str, Any] = {"security_protocol": self.protocol.value,
                                  "ssl_context": self.ssl_context()}
        if self.protocol is Protocol.SASL_SSL:
            kwargs.update(sasl_mechanism=self.mechanism.value, sasl_plain_username=self.user,
                          sasl_plain_password=self.password)
        return kwargs

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying TLS context (hostname and chain); one per distinct setting, reused."""
        return _ssl_context(self.ca_file, self.cert_file, self.key_file, self.key_password)

    def faust_credentials(self) -> Any:
        """The Faust app's broker_credentials (None for PLAINTEXT)."""
        import faust

        if not self.uses_tls:
            return None
        if self.protocol is Protocol.SSL:
            return faust.SSLCredentials(self.ssl_context())
        return faust.SASLCredentials(username=self.user, password=self.password,
                                     ssl_context=self.ssl_context(), mechanism=self.mechanism.value)

    def as_env(self) -> dict[str, str]:
        """The settings as variables, for child processes (the password included)."""
        return {
            "SARDIS_KAFKA_SECURITY_PROTOCOL": self.protocol.value,
            "SARDIS_KAFKA_SASL_MECHANISM": self.mechanism.value,
            "SARDIS_KAFKA_USER": self.user,
            "SARDIS_KAFKA_PASSWORD": self.password,
            "SARDIS_KAFKA_CA_FILE": self.ca_file,
            "SARDIS_KAFKA_CERT_FILE": self.cert_file,
            "SARDIS_KAFKA_KEY_FILE": self.key_file,
            "SARDIS_KAFKA_KEY_PASSWORD": self.key_password,
        }


SecretReader = Callable[[Mapping[str, str], str], str]


def from_env(env: Mapping[str, str], secret: SecretReader) -> KafkaSecurity:
    """KafkaSecurity from SARDIS_KAFKA_* variables; `secret` reads NAME or NAME_FILE."""
    raw_protocol = env.get("SARDIS_KAFKA_SECURITY_PROTOCOL", "").strip().upper() or "PLAINTEXT"
    try:
        protocol = Protocol(raw_protocol)
    except ValueError as exc:
        raise ConfigError(f"SARDIS_KAFKA_SECURITY_PROTOCOL={raw_protocol!r}: use "
                          f"{'|'.join(p.value for p in Protocol)} (SASL_PLAINTEXT would send the "
                          "password exchange and every record unencrypted)") from exc
    raw_mechanism = env.get("SARDIS_KAFKA_SASL_MECHANISM", "").strip().upper() or \
        Mechanism.SCRAM_SHA_512.value
    try:
        mechanism = Mechanism(raw_mechanism)
    except ValueError as exc:
        raise ConfigError(f"SARDIS_KAFKA_SASL_MECHANISM={raw_mechanism!r}: use "
                          f"{'|'.join(m.value for m in Mechanism)}") from exc
    security = KafkaSecurity(
        protocol=protocol, mechanism=mechanism, user=env.get("SARDIS_KAFKA_USER", ""),
        password=secret(env, "SARDIS_KAFKA_PASSWORD"),
        ca_file=env.get("SARDIS_KAFKA_CA_FILE", ""), cert_file=env.get("SARDIS_KAFKA_CERT_FILE", ""),
        key_file=env.get("SARDIS_KAFKA_KEY_FILE", ""),
        key_password=secret(env, "SARDIS_KAFKA_KEY_PASSWORD"))
    check(security)
    return security


def check(security: KafkaSecurity) -> None:
    """ConfigError for a combination that cannot work or would quietly weaken the connection."""
    protocol = security.protocol
    if protocol is Protocol.SASL_SSL and not (security.user and security.password):
        raise ConfigError("SARDIS_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs SARDIS_KAFKA_USER and "
                          "SARDIS_KAFKA_PASSWORD (or SARDIS_KAFKA_PASSWORD_FILE)")
    if protocol is not Protocol.SASL_SSL and (security.user or security.password):
        raise ConfigError(f"SARDIS_KAFKA_USER/PASSWORD are set but the protocol is {protocol.value}: "
                          "they would not be used; set SARDIS_KAFKA_SECURITY_PROTOCOL=SASL_SSL")
    if bool(security.cert_file) != bool(security.key_file):
        raise ConfigError("set both SARDIS_KAFKA_CERT_FILE and SARDIS_KAFKA_KEY_FILE, or neither")
    tls_files = (security.ca_file, security.cert_file, security.key_file)
    if protocol is Protocol.PLAINTEXT and any(tls_files):
        raise ConfigError("SARDIS_KAFKA_CA_FILE/CERT_FILE/KEY_FILE are set but the protocol is "
                          "PLAINTEXT: set SARDIS_KAFKA_SECURITY_PROTOCOL=SSL or SASL_SSL")
    for name, path in zip(("SARDIS_KAFKA_CA_FILE", "SARDIS_KAFKA_CERT_FILE",
                           "SARDIS_KAFKA_KEY_FILE"), tls_files, strict=True):
        if path and not Path(path).is_file():
            raise ConfigError(f"{name}={path}: no such file")


@functools.lru_cache(maxsize=16)
def _ssl_context(ca_file: str, cert_file: str, key_file: str, key_password: str) -> ssl.SSLContext:
    # create_default_context: CERT_REQUIRED and check_hostname on; there is deliberately no
    # setting that turns either off.
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
        if cert_file:
            context.load_cert_chain(cert_file, key_file, password=key_password or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"Kafka TLS files (CA {ca_file or 'system'}, certificate "
                          f"{cert_file or 'none'}): {exc}") from exc
    return context
