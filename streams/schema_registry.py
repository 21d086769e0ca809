"""Client of a schema registry's Confluent-compatible REST API: the few calls the ledger makes."""

# Blocking urllib on purpose: no new dependency, and the calls are few (a handful per schema and
# process start, one per schema id never seen before). Async callers run them in a thread
# (streams/wire.py). Tested against Apicurio Registry 2.4.2's /apis/ccompat/v7 (README: Schema
# registry); Confluent Schema Registry serves the same paths at its root.

from __future__ import annotations

import base64
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Final

from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import RegistryError

REGISTRY_TIMEOUT_S: Final[float] = 5.0  # per HTTP request
# Attempts per call when the registry gave no answer, a 5xx or a 429; other answers are final.
REGISTRY_ATTEMPTS: Final[int] = 4
REGISTRY_BACKOFF_S: Final[float] = 0.25  # before the second attempt; doubles for each next one
REGISTRY_BACKOFF_MAX_S: Final[float] = 2.0
REGISTRY_RESPONSE_BYTES_MAX: Final[int] = 4 * 1024 * 1024  # a schema is far smaller
REGISTRY_MESSAGE_CHARS_MAX: Final[int] = 512  # of a registry's error message, in our errors
CONTENT_TYPE: Final[str] = "application/vnd.schemaregistry.v1+json"
HTTP_NOT_FOUND: Final[int] = 404
HTTP_CONFLICT: Final[int] = 409  # an incompatible schema, when registering
HTTP_TOO_MANY_REQUESTS: Final[int] = 429
HTTP_SERVER_ERROR_MIN: Final[int] = 500

BACKWARD: Final[str] = "BACKWARD"
# Levels that keep BACKWARD's promise (a new version reads what the previous one wrote).
BACKWARD_OR_STRICTER: Final[frozenset[str]] = frozenset(
    {"BACKWARD", "BACKWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE"})


class SchemaRegistry:
    """One registry: base URL (up to and including /apis/ccompat/v7 for Apicurio) and optional
    basic-auth credentials, which go in a header only (never in a URL, a message or a log)."""

    def __init__(self, url: str, user: str = "", password: str = "", *,
                 timeout_s: float = REGISTRY_TIMEOUT_S, attempts: int = REGISTRY_ATTEMPTS,
                 backoff_s: float = REGISTRY_BACKOFF_S) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self._headers = {"Accept": CONTENT_TYPE, "Content-Type": CONTENT_TYPE}
        if user:
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"

    @classmethod
    def from_settings(cls, settings: Settings) -> SchemaRegistry | None:
        """The configured registry, or None when SARDIS_SCHEMA_REGISTRY_URL is empty."""
        if not settings.schema_registry_url:
            return None
        return cls(settings.schema_registry_url, settings.schema_registry_user,
                   settings.schema_registry_password)

    def __repr__(self) -> str:
        return f"SchemaRegistry({self.url!r})"

    # --- The calls (Confluent Schema Registry API v7 paths).

    def subjects(self) -> list[str]:
        """Every subject (also the harness's health check)."""
        found = self.call("GET", "/subjects")
        if not isinstance(found, list):
            raise RegistryError(f"GET {self.url}/subjects: not a list: {found!r:.100}")
        return [str(subject) for subject in found]

    def register(self, subject: str, text: str) -> int:
        """The id of Avro schema `text` under `subject`: registered as a new version, or the
        existing id if that exact text is registered already. An incompatible schema raises
        RegistryError with status 409 and the registry's reason."""
        answer = self.call("POST", f"/subjects/{_quote(subject)}/versions",
                           {"schema": text, "schemaType": "AVRO"})
        return _schema_id(answer, f"registering under {subject}")

    def schema(self, schema_id: int) -> str:
        """The JSON text of the schema with this id (RegistryError status 404 if none)."""
        answer = self.call("GET", f"/schemas/ids/{int(schema_id)}")
        if not isinstance(answer, dict) or not isinstance(answer.get("schema"), str):
            raise RegistryError(f"GET {self.url}/schemas/ids/{schema_id}: no schema in the answer")
        # A Protobuf or JSON Schema text is returned as it is: the codec refuses it as no Avro.
        return str(answer["schema"])

    def compatibility(self, subject: str) -> str | None:
        """The compatibility level that applies to `subject`, or None while it has none (Apicurio
        answers 404 for a subject without versions or a level of its own)."""
        try:
            answer = self.call("GET", f"/config/{_quote(subject)}")
        except RegistryError as exc:
            if exc.status == HTTP_NOT_FOUND:
                return None
            raise
        level = answer.get("compatibilityLevel") if isinstance(answer, dict) else None
        return str(level) if level else None

    def set_compatibility(self, subject: str, level: str) -> None:
        self.call("PUT", f"/config/{_quote(subject)}", {"compatibility": level})

    # --- HTTP with retries; every failure becomes a RegistryError.

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One API call, retried (with backoff) while the registry gives no usable answer."""
        delay_s = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                return self._once(method, path, body)
            except RegistryError as exc:
                if not exc.retriable or attempt == self.attempts:
                    raise
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, REGISTRY_BACKOFF_MAX_S)
        raise RegistryError(f"{method} {self.url}{path}: no attempt made", retriable=True)

    def _once(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        url = f"{self.url}{path}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read(REGISTRY_RESPONSE_BYTES_MAX + 1)
        except urllib.error.HTTPError as exc:
            raise _http_error(method, url, exc) from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            # refused, reset, DNS, timeout, a connection closed half-way through the answer
            reason = getattr(exc, "reason", exc)
            raise RegistryError(f"{method} {url}: no answer ({reason!r})", retriable=True) from exc
        if len(raw) > REGISTRY_RESPONSE_BYTES_MAX:
            raise RegistryError(f"{method} {url}: answer over {REGISTRY_RESPONSE_BYTES_MAX} bytes")
        try:
            return json.loads(raw) if raw else None
        except ValueError as exc:
            raise RegistryError(f"{method} {url}: the answer is not JSON") from exc


def _quote(subject: str) -> str:
    return urllib.parse.quote(subject, safe="")


def _schema_id(answer: Any, what: str) -> int:
    schema_id = answer.get("id") if isinstance(answer, dict) else None
    if not isinstance(schema_id, int) or isinstance(schema_id, bool) or schema_id < 0:
        raise RegistryError(f"{what}: the registry answered no schema id: {answer!r:.200}")
    return schema_id


def _http_error(method: str, url: str, exc: urllib.error.HTTPError) -> RegistryError:
    """The registry's own message and error code (e.g. 40401) when its body has them."""
    message, error_code = exc.reason, None
    try:
        body = json.loads(exc.read(REGISTRY_RESPONSE_BYTES_MAX))
        if isinstance(body, dict):
            message = str(body.get("message", message))
            code = body.get("error_code")
            error_code = code if isinstance(code, int) else None
    except (ValueError, OSError):
        pass  # not JSON: the HTTP reason phrase says enough
    status = exc.code
    retriable = status == HTTP_TOO_MANY_REQUESTS or status >= HTTP_SERVER_ERROR_MIN
    return RegistryError(f"{method} {url}: HTTP {status}"
                         f"{f' (error {error_code})' if error_code is not None else ''}: "
                         f"{str(message)[:REGISTRY_MESSAGE_CHARS_MAX]}",
                         status=status, error_code=error_code, retriable=retriable)
