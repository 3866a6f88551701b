"""replfs.txn."""
