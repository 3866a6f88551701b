"""The block mapping is md's left-symmetric RAID-5; the layout fits the disk."""

import pytest

from replfs.raid.layout import make_geometry

pytestmark = pytest.mark.timeout(120)


def test_left_symmetric_matches_md():
    g = make_geometry(4, 4096, 1000)  # chunk = one block, so logical block == chunk
    # md left-symmetric, 4 disks (rows top to bottom, columns = disks 0..3):
    #   D0 D1 D2 P
    #   D4 D5 P  D3
    #   D8 P  D6 D7
    #   P  D9 D10 D11
    want = [[0, 1, 2, "P"], [4, 5, "P", 3], [8, "P", 6, 7], ["P", 9, 10, 11]]
    for row, cols in enumerate(want):
        for disk, what in enumerate(cols):
            if what == "P":
                assert g.parity_disk(row) == disk
            else:
                r, role, off = g.locate(what)
                assert (r, g.data_disk(r, role)) == (row, disk)
                assert g.role(row, disk) == role


def test_areas_do_not_overlap_and_fit():
    g = make_geometry(5, 65536, (64 << 20) // 4096)
    assert g.cs_start >= g.bitmap_start + g.bitmap_blocks
    assert g.data_start >= g.cs_start + g.cs_blocks
    assert g.data_start % g.cb == 0
    assert g.data_start + g.entries <= g.disk_blocks - 1  # copy B of the superblock after
    assert g.cs_blocks * 1023 >= g.entries
    assert g.nblocks == g.rows * g.cb * 4


@pytest.mark.parametrize("n,chunk,size,msg", [
    (2, 65536, 1 << 20, "at least 3"),
    (3, 3000, 1 << 20, "power of two"),
    (3, 65536, 65536, "too small"),
])
def test_bad_geometry(n, chunk, size, msg):
    with pytest.raises(ValueError, match=msg):
        make_geometry(n, chunk, size // 4096)
