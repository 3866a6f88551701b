"""replfs.raid: the RAID-5 array of disk images that everything else stands on."""

from .array import Array, create_array, inspect_array, open_array, parse_size
from .blockdev import BlockDevice, BlockIOError, FileDevice, MemoryDevice
from .errors import RaidError

__all__ = ["Array", "BlockDevice", "BlockIOError", "FileDevice", "MemoryDevice", "RaidError",
           "create_array", "inspect_array", "open_array", "parse_size"]
