"""The primary's persistent dirty map (replication/dirtymap.py) on a real file: what it
keeps across a crash of its process (a new object on the same file, the old one never
closed), what a rebase clears, and when it is not trusted."""

import os

import msgpack
import pytest

from replfs.replication.dirtymap import HEADER, DirtyMap

pytestmark = pytest.mark.timeout(30)

N = 100_000


def reopen(path) -> DirtyMap:
    """As a server restarted after `kill -9` opens it (the old object is abandoned)."""
    return DirtyMap(str(path), N)


def test_marks_and_base_survive_a_crash_and_only_forced_history_is_cleared(tmp_path):
    m = DirtyMap(str(tmp_path / "dirty.map"), N)
    assert m.base is None and not m.covers(("inc", 0))
    m.mark([5, 6, 99_999], lsn=100)
    m.rebase("inc", 50)                 # the backup forced up to 50: nothing older marked
    m.mark([6, 7], lsn=200)
    m.mark([40_000], lsn=300)
    assert m.blocks() == [5, 6, 7, 40_000, 99_999]
    assert m.rebase("inc", 200) == 4    # 5, 6, 7, 99_999 are forced on the backup
    assert m.blocks() == [40_000]
    assert m.covers(("inc", 200)) and m.covers(("inc", 250))
    assert not m.covers(("inc", 199)) and not m.covers(("other", 500))
    assert not m.covers(("", 0))
    m.mark([8], lsn=400)
    after = reopen(tmp_path / "dirty.map")
    assert after.blocks() == [8, 40_000] and after.base == ("inc", 200)
    # a new incarnation: every old mark is older than its first commit
    after.settle()
    after.mark([9], lsn=10)
    assert after.rebase("new", 5) == 2 and after.blocks() == [9]


def test_invalidate_forgets_base_and_marks_on_disk(tmp_path):
    m = DirtyMap(str(tmp_path / "dirty.map"), N)
    m.mark([1, 2, 3], lsn=10)
    m.rebase("inc", 5)
    m.invalidate()
    after = reopen(tmp_path / "dirty.map")
    assert after.base is None and len(after) == 0 and not after.covers(("inc", 5))


def write_header(path, **fields):
    with open(path, "r+b") as f:
        raw = f.read(HEADER)
        h = msgpack.unpackb(raw[2:2 + int.from_bytes(raw[:2], "little")])
        h.update(fields)
        body = msgpack.packb(h)
        f.seek(0)
        f.write((len(body).to_bytes(2, "little") + body).ljust(HEADER, b"\0"))


def test_a_map_left_open_across_a_reboot_is_not_trusted(tmp_path):
    path = tmp_path / "dirty.map"
    m = DirtyMap(str(path), N)
    m.mark([1], lsn=10)
    m.rebase("inc", 5)
    os.close(m.fd)
    write_header(path, boot="an-earlier-boot")      # open, unforced, under another boot
    after = reopen(path)
    assert after.base is None and len(after) == 0


def test_a_cleanly_closed_map_survives_a_reboot(tmp_path):
    path = tmp_path / "dirty.map"
    m = DirtyMap(str(path), N)
    m.mark([1, 77], lsn=10)
    m.rebase("inc", 5)
    m.close()
    write_header(path, boot="an-earlier-boot")
    after = reopen(path)
    assert after.base == ("inc", 5) and after.blocks() == [1, 77]


def test_a_map_of_another_array_size_is_dropped(tmp_path):
    path = tmp_path / "dirty.map"
    m = DirtyMap(str(path), N)
    m.mark([1], lsn=10)
    m.rebase("inc", 5)
    m.close()
    other = DirtyMap(str(path), N * 2)
    assert other.base is None and len(other) == 0
    assert os.path.getsize(path) == HEADER + N * 2 // 8


def test_status_names_the_kind_of_a_running_transfer_and_its_blocks():
    from replfs.tools.status_cmd import _replication, _transfers
    servers = {
        "s0": dict(role="primary", sync_kind="incremental", sync_progress=[64, 210]),
        "s1": dict(role="backup", sync_kind="incremental", sync_progress=[64, 210],
                   backup_synced=False),
        "s2": dict(role="primary", sync_kind="full", sync_progress=[9000, 9000], lag_bytes=0),
    }
    assert _replication(servers["s0"]) == "incr 30%"
    assert _replication(servers["s1"]) == "incr 30%"
    assert _replication(servers["s2"]).startswith("lag ")      # done: no transfer shown
    assert _transfers(dict(servers=servers)) == [
        "s0: incremental transfer to its backup, 64 of 210 blocks sent"]


def test_a_promoted_backup_merges_only_with_its_old_primarys_map(tmp_path):
    m = DirtyMap(str(tmp_path / "dirty.map"), N)
    m.mark([1], lsn=10)
    m.invalidate()                      # it followed primary "old" as its backup
    m.settle()
    m.promoted(("old", 500))            # promoted, holding "old"'s state up to 500
    assert m.origin == ("old", 500) and not m.covers(("old", 500))
    m.mark([3], lsn=1)
    after = reopen(tmp_path / "dirty.map")                  # across a crash too
    assert after.origin == ("old", 500) and after.blocks() == [3]
    # the old primary's map, based at or before 500 in its own incarnation, merges
    assert after.merges(["old", 500]) and after.merges(["old", 120])
    assert not after.merges(["old", 501]) and not after.merges(["other", 100])
    assert not after.merges(None) and not after.merges(["", 0]) and not after.merges("x")
    # a map of its own (not invalidated) takes no origin; a rebase and invalidate end it
    fresh = DirtyMap(str(tmp_path / "other.map"), N)
    fresh.mark([2], lsn=5)
    fresh.promoted(("old", 500))
    assert fresh.origin is None
    after.rebase(after.base[0] if after.base else "new", 1)
    assert after.origin is None and not after.merges(["old", 100])
    m2 = reopen(tmp_path / "dirty.map")
    assert m2.origin is None
    m2.promoted(("old", 700))           # (it has a base of its own: no origin)
    assert m2.origin is None
    m2.invalidate()
    m2.promoted(("old", 700))
    assert m2.origin == ("old", 700)
    m2.invalidate()
    assert m2.origin is None and reopen(tmp_path / "dirty.map").origin is None
