"""Compiles the package's Solidity contracts with the provisioned solc-js, offline, with a cache."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sardis_ledger.streams.chain.errors import ChainConfigError, CompileError

CONTRACTS_DIR = Path(__file__).resolve().parent / "contracts"
# Cancun runs on anvil and on the chains the ledger settles on; pinning it keeps the bytecode (and
# the cache key) the same whatever solc's own default becomes.
EVM_VERSION = "cancun"
OPTIMIZER_RUNS = 200
COMPILE_TIMEOUT_S = 300.0
CACHE_SUBDIR = "solc-out"

# solc-js is a CommonJS module; this script runs it on one standard-JSON input read from stdin.
_NODE_SCRIPT = """
const solc = require(process.argv[1]);
let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  process.stdout.write(JSON.stringify({version: solc.version(), output: JSON.parse(solc.compile(input))}));
});
"""


@dataclass(frozen=True, slots=True)
class CompiledContract:
    """ABI and creation bytecode of one contract."""

    name: str
    abi: list[dict[str, Any]]
    bytecode: bytes


def solcjs_module() -> Path:
    """The solc-js npm package the dev harness provisions (infra/anvil/package.json)."""
    from infra import harness

    return harness.solcjs_path()


def _cache_dir() -> Path:
    from infra import harness

    return harness.cache_dir() / CACHE_SUBDIR


def standard_json_input(sources: dict[str, str]) -> dict[str, Any]:
    return {
        "language": "Solidity",
        "sources": {name: {"content": text} for name, text in sorted(sources.items())},
        "settings": {
            "evmVersion": EVM_VERSION,
            "optimizer": {"enabled": True, "runs": OPTIMIZER_RUNS},
            "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object"]}},
        },
    }


def compile_sources(sources: dict[str, str], module: Path | None = None) -> dict[str, CompiledContract]:
    """Compile Solidity sources (file name -> text); every contract by name. Cached on disk by
    the exact input and the solc-js package, so tests compile once per machine."""
    module = module or solcjs_module()
    if not (module / "soljson.js").exists():
        raise ChainConfigError(f"solc-js is not provisioned at {module}; run `sardis-ledger dev up`")
    node = shutil.which("node")
    if node is None:
        raise ChainConfigError("node (Node.js) is not on PATH; solc-js needs it")
    request = json.dumps(standard_json_input(sources), sort_keys=True)
    package = (module / "package.json").read_bytes()
    key = hashlib.sha256(request.encode() + b"\0" + package).hexdigest()[:32]
    cached = _cache_dir() / f"{key}.json"
    if cached.exists():
        result = json.loads(cached.read_text())
    else:
        try:
            done = subprocess.run([node, "-e", _NODE_SCRIPT, str(module)], input=request.encode(),
                                  capture_output=True, timeout=COMPILE_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CompileError(f"running solc-js: {exc}") from exc
        if done.returncode != 0:
            raise CompileError(f"solc-js exited with {done.returncode}: "
                               f"{done.stderr.decode(errors='replace')[-2000:]}")
        result = json.loads(done.stdout)
        errors = [e for e in result["output"].get("errors", []) if e.get("severity") == "error"]
        if errors:
            raise CompileError("solc: " + "\n".join(e.get("formattedMessage", e.get("message", ""))
                                                    for e in errors))
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(".tmp")
        partial.write_text(json.dumps(result))
        partial.replace(cached)  # atomic: a concurrent reader never sees half a file
    contracts: dict[str, CompiledContract] = {}
    for file_contracts in result["output"].get("contracts", {}).values():
        for name, data in file_contracts.items():
            contracts[name] = CompiledContract(name, data["abi"],
                                               bytes.fromhex(data["evm"]["bytecode"]["object"]))
    return contracts


def precompiled(name: str) -> CompiledContract | None:
    """contracts/<name>.json, shipped in the package so deploying needs no Node.js, if it was
    compiled from the current contracts/<name>.sol (else None: the source changed since)."""
    path = CONTRACTS_DIR / f"{name}.json"
    source = CONTRACTS_DIR / f"{name}.sol"
    if not path.exists() or not source.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("source_sha256") != hashlib.sha256(source.read_bytes()).hexdigest():
        return None
    return CompiledContract(name, data["abi"], bytes.fromhex(data["bytecode"]))


def write_precompiled(name: str) -> Path:
    """Compile contracts/<name>.sol with the provisioned solc-js and store contracts/<name>.json
    (`python -m streams.chain.solc LedgerAnchor` after changing the contract)."""
    source = CONTRACTS_DIR / f"{name}.sol"
    compiled = _compile_source(name, source)
    module = solcjs_module()
    data = {"contract": name, "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
            "solc_js": json.loads((module / "package.json").read_text())["version"],
            "evm_version": EVM_VERSION, "optimizer_runs": OPTIMIZER_RUNS,
            "abi": compiled.abi, "bytecode": compiled.bytecode.hex()}
    path = CONTRACTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def compile_contract(name: str) -> CompiledContract:
    """One of the package's contracts: the shipped precompiled one when it matches the source,
    else contracts/<name>.sol compiled with solc-js (dev tooling: Node.js)."""
    shipped = precompiled(name)
    if shipped is not None:
        return shipped
    return _compile_source(name, CONTRACTS_DIR / f"{name}.sol")


def _compile_source(name: str, path: Path) -> CompiledContract:
    if not path.exists():
        raise ChainConfigError(f"no contract source {path}")
    contracts = compile_sources({path.name: path.read_text()})
    if name not in contracts:
        raise CompileError(f"{path.name} compiled but defines no contract {name}")
    return contracts[name]


if __name__ == "__main__":
    import sys

    for contract in sys.argv[1:] or ["LedgerAnchor"]:
        print(write_precompiled(contract))
