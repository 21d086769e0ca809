"""Reads and creates Kafka ACLs with raw protocol requests: aiokafka 0.14's admin client has no
create_acls/describe_acls (it raises NotImplementedError for both), so this module sends
CreateAcls/DescribeAcls itself. Version 1 of each is what aiokafka knows and Kafka 4 still takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sardis_ledger.streams.acl import AclBinding, Operation, PatternType, Permission, ResourceType
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import LedgerError

ACL_REQUEST_TIMEOUT_MS = 15_000
ANY_HOST = "*"


class AclError(LedgerError):
    """The broker refused to list or create ACLs (or could not be reached)."""


@dataclass(frozen=True, slots=True)
class AclReport:
    created: tuple[AclBinding, ...]
    present: tuple[AclBinding, ...]
    # ALLOW rules of the plan's principals that the plan does not have (left alone: review them)
    unplanned: tuple[AclBinding, ...]


async def existing(admin: Any) -> set[AclBinding]:
    """Every ALLOW rule for any host that the broker holds (DescribeAcls with an ANY filter)."""
    from aiokafka.errors import for_code
    from aiokafka.protocol.admin import DescribeAclsRequest

    response = await admin._send_request(DescribeAclsRequest(
        ResourceType.ANY, None, PatternType.ANY, None, None, Operation.ANY, Permission.ANY))
    if response.error_code:
        raise AclError(f"describing ACLs: {for_code(response.error_code).__name__}: "
                       f"{response.error_message}")
    found: set[AclBinding] = set()
    for resource_type, name, pattern, acls in response.resources:
        for principal, host, operation, permission in acls:
            if permission != Permission.ALLOW or host != ANY_HOST:
                continue
            try:
                found.add(AclBinding(principal, ResourceType(resource_type), PatternType(pattern),
                                     name, Operation(operation)))
            except ValueError:
                continue  # an operation or resource this ledger never grants (e.g. ALTER)
    return found


async def create(admin: Any, binding: AclBinding) -> None:
    from aiokafka.errors import for_code
    from aiokafka.protocol.admin import CreateAclsRequest

    response = await admin._send_request(CreateAclsRequest(
        binding.resource_type, binding.name, binding.pattern, binding.principal, ANY_HOST,
        binding.operation, Permission.ALLOW))
    for code, message in response.creation_responses:
        if code:
            raise AclError(f"creating {binding.row().strip()}: {for_code(code).__name__}: {message}")


def _prefixed_elsewhere(binding: AclBinding, bindings: tuple[AclBinding, ...]) -> bool:
    """For the unprefixed plan: is `binding` a planned rule's name with a prefix in front?"""
    return any(binding.name.endswith(b.name) and binding.name != b.name for b in bindings)


async def apply(settings: Settings, bindings: tuple[AclBinding, ...], prefix: str = "") -> AclReport:
    """Create the rules of `bindings` the broker lacks; idempotent. Runs as the principal in
    SARDIS_KAFKA_* (it needs ALTER on the cluster: an admin or super user)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(**settings.kafka_connection(),
                                request_timeout_ms=ACL_REQUEST_TIMEOUT_MS)
    try:
        await admin.start()
        before = await existing(admin)
        missing = [b for b in bindings if b not in before]
        for binding in missing:
            await create(admin, binding)
    except KafkaError as exc:
        raise AclError(f"ACLs on {settings.kafka_bootstrap}: {exc!r}") from exc
    finally:
        await admin.close()
    principals = {b.principal for b in bindings}
    planned = set(bindings)
    # Rules under other prefixes belong to other deployments sharing the cluster.
    unplanned = sorted(b for b in before if b.principal in principals and b not in planned
                       and prefix in b.name and (prefix or not _prefixed_elsewhere(b, bindings)))
    return AclReport(tuple(missing), tuple(b for b in bindings if b in before), tuple(unplanned))
