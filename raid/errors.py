"""Errors of the RAID layer that a user sees (bad input, unusable disks)."""

from replfs.errors import ReplfsError


class RaidError(ReplfsError):
    """The array cannot do what was asked; the message says why and what to do."""


class WriteHole(RaidError):
    """An unclean stop while degraded: some rows may have been mid-write (the RAID-5
    write hole), so the missing disk's blocks there cannot be rebuilt. `open_array`
    with `force` serves the rest, or with `zero_lost` makes those rows whole again with
    the lost blocks zeroed (for a replica that then takes a full copy from its partner).
    """
