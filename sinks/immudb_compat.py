"""immudb-py workarounds. immudb-py 1.5.0's ImmudbClient has no TLS option: its constructor always
opens grpc.insecure_channel, so against a TLS immudb every call fails with UNAVAILABLE ('Socket
closed'). use_tls swaps in a verifying grpc.secure_channel before the first call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sardis_ledger.sinks.errors import SinkError

CA_FILE_BYTES_MAX = 1_048_576


def use_tls(client: Any, address: str, ca_file: str) -> None:
    """Make `client` (not yet logged in) talk TLS to `address`, trusting only `ca_file`.

    The server's certificate chain and its name (the host part of `address`) are verified by
    gRPC; there is no way to turn that off here.
    """
    import grpc

    try:
        with Path(ca_file).open("rb") as handle:
            roots = handle.read(CA_FILE_BYTES_MAX + 1)
    except OSError as exc:
        raise SinkError(f"SARDIS_IMMUDB_CA_FILE={ca_file}: cannot read it ({exc.strerror})") from exc
    if len(roots) > CA_FILE_BYTES_MAX or b"BEGIN CERTIFICATE" not in roots:
        raise SinkError(f"SARDIS_IMMUDB_CA_FILE={ca_file}: not a PEM certificate bundle")
    client.channel.close()
    client.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=roots))
    client._resetStub()
