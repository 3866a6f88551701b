"""replfs.replication."""
