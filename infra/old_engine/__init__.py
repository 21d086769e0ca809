"""The old engine (sardis-ledger 1.1.0's PostgresLedgerEngine) in a scratch venv, for comparison."""
