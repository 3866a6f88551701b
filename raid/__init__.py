"""replfs.raid."""
