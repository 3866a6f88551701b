"""replfs.fs."""
