"""replfs.tools."""
