"""Sink consumers that copy committed entries into PostgreSQL and immudb."""
