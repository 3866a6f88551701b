"""Errors of the RAID layer that a user sees (bad input, unusable disks)."""

from replfs.errors import ReplfsError


class RaidError(ReplfsError):
    """The array cannot do what was asked; the message says why and what to do."""
