"""replfs has no POSIX ACLs and says so as a filesystem without them does (EOPNOTSUPP
for their xattr names), so tools that preserve permissions fall back to chmod: the core
in-process, and cp -a, mv, rsync -aAX, tar --acls on a real local mount."""

import errno

import pytest

from mounthelp import mounted_array
from replfs.fs.errors import FsError
from treemodes import acl_disagreements, compare_tools, make_tree

pytestmark = pytest.mark.timeout(180)

ROOT = 1  # pyfuse3.ROOT_INODE: group 0's root directory
ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
# a valid access ACL (user::rw- group::r-- other::r--), as cp would send it
ACL_VALUE = bytes.fromhex("02000000" "0100060000000000" "0400040000000000" "2000040000000000")


async def test_core_refuses_acl_names(fs):
    f = await fs.create(ROOT, b"f", 0o644, 0, 0)
    for name in ACL_NAMES:
        for call in (fs.getxattr(f.ino, name), fs.setxattr(f.ino, name, ACL_VALUE),
                     fs.removexattr(f.ino, name)):
            with pytest.raises(FsError) as e:
                await call
            assert e.value.errno == errno.EOPNOTSUPP
    await fs.setxattr(f.ino, b"user.a", b"1")
    assert await fs.listxattr(f.ino) == [b"user.a"]
    assert (await fs.getattr(f.ino)).mode & 0o7777 == 0o644


async def test_core_hides_an_acl_stored_before(fs):
    """An ACL stored as a plain xattr by an older replfs is neither listed nor read."""
    f = await fs.create(ROOT, b"f", 0o600, 0, 0)

    async def put(op):
        node = await op.inode(f.ino, "X")
        await fs._put_xattrs(op, f.ino, node, {ACL_NAMES[0]: ACL_VALUE, b"user.b": b"2"})
    await fs._run("test-put", put)
    assert await fs.listxattr(f.ino) == [b"user.b"]
    with pytest.raises(FsError) as e:
        await fs.getxattr(f.ino, ACL_NAMES[0])
    assert e.value.errno == errno.EOPNOTSUPP


@pytest.fixture(scope="module")
def mount(tmp_path_factory):
    with mounted_array(tmp_path_factory.mktemp("acl"), 4, "32M") as m:
        yield m


def test_local_mount_tools_give_ext4_modes(mount, tmp_path):
    src = make_tree(tmp_path / "src")
    ref = tmp_path / "ref"
    ref.mkdir()
    dst = mount.mnt / "copies"
    dst.mkdir()
    diffs, failures = compare_tools(src, dst, ref)
    assert diffs == {}
    assert failures == {}
    assert acl_disagreements(dst) == []
