"""replfs.raid: the RAID-5 array of disk images that everything else stands on."""

from .array import DEFAULT_CHECKSUM_CACHE, Array, parse_size
from .assemble import create_array, inspect_array, open_array
from .blockdev import BlockDevice, BlockIOError, FileDevice, MemoryDevice
from .errors import RaidError, WriteHole

__all__ = ["Array", "BlockDevice", "DEFAULT_CHECKSUM_CACHE", "BlockIOError", "FileDevice", "MemoryDevice", "RaidError", "WriteHole",
           "create_array", "inspect_array", "open_array", "parse_size"]
