"""Avro contracts of sardis-ledger (the .avsc files beside this module) and their wire codec."""
