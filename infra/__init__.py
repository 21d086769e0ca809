"""Provisioning and lifecycle of the local dev servers (Kafka, PostgreSQL, immudb, anvil)."""
