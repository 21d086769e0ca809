"""sardis-ledger stream app: the pure ledger core and the Faust agents around it."""
