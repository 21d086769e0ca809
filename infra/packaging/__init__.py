"""Packaging tools: the import codemod and the wheel check (not shipped in the wheel)."""
