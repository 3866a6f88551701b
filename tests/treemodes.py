"""Copy a tree of varied modes with the real tools that preserve permissions (cp -a,
cp -rp, mv from another filesystem, rsync -aAX, tar --acls) into a replfs mount and into
a reference directory on the machine's own filesystem, and compare what each gives."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

# relative path -> mode; directories end with "/"
TREE = {
    "d755/": 0o755, "d700/": 0o700, "d2775/": 0o2775, "d1777/": 0o1777, "d755/sub/": 0o750,
    "f644": 0o644, "f600": 0o600, "f755": 0o755, "f444": 0o444, "f4755": 0o4755,
    "d755/g640": 0o640, "d700/g664": 0o664, "d2775/g2755": 0o2755, "d755/sub/h400": 0o400,
}

# (name, shell command): $SRC the source tree, $DST the directory to copy into, $STAGE a
# scratch directory on another filesystem than $DST (for mv)
TOOLS = [
    ("cp_a", 'cp -a "$SRC" "$DST/cp_a"'),
    ("cp_p", 'cp -rp "$SRC" "$DST/cp_p"'),
    ("mv", 'cp -a "$SRC" "$STAGE/mv" && mv "$STAGE/mv" "$DST/mv"'),
    ("rsync", 'rsync -aAX "$SRC/" "$DST/rsync/"'),
    ("tar", 'mkdir "$DST/tar" && tar --acls --xattrs -C "$SRC" -cf - . '
            '| tar --acls --xattrs -xpf - -C "$DST/tar"'),
]


def make_tree(root: Path) -> Path:
    """The source tree (modes set after creation, so the umask does not matter)."""
    root.mkdir(parents=True)
    for rel in sorted(TREE):
        p = root / rel.rstrip("/")
        if rel.endswith("/"):
            p.mkdir()
        else:
            p.write_text(rel)
    (root / "link").symlink_to("f644")
    # deepest first, so a directory made 0700 or 0400 is set once nothing is made in it
    for rel in sorted(TREE, key=len, reverse=True):
        os.chmod(root / rel.rstrip("/"), TREE[rel])
    os.chmod(root, 0o755)
    return root


def modes(root: Path) -> dict[str, int]:
    """Every path under root (root itself as ".") -> its full st_mode (lstat)."""
    out = {".": os.lstat(root).st_mode}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = os.lstat(p).st_mode
    return out


def run_tool(cmd: str, src: Path, dst: Path, stage: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, SRC=str(src), DST=str(dst), STAGE=str(stage))
    return subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], env=env,
                          capture_output=True, text=True, timeout=120)


def stage_dir_for(dst: Path) -> Path:
    """A scratch directory on another filesystem than `dst` (tmpfs /dev/shm, else /tmp)."""
    for base in ("/dev/shm", "/tmp", "/var/tmp"):
        if os.path.isdir(base) and os.stat(base).st_dev != os.stat(dst).st_dev:
            d = Path(base) / f"replfs-stage-{os.getpid()}-{os.stat(dst).st_dev}"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            return d
    raise AssertionError(f"no directory on another filesystem than {dst}")


def acl_disagreements(root: Path) -> list[str]:
    """Paths where `ls -l` and `getfacl` disagree: ls shows a '+' (an ACL beyond the
    mode), or getfacl's owner/group/other entries are not the mode's bits, or getfacl
    names other entries. Symlinks are skipped (neither tool follows them here)."""
    bad = []
    paths = [p for p in [root, *sorted(root.rglob("*"))] if not p.is_symlink()]
    ls = subprocess.run(["ls", "-ld", *map(str, paths)], capture_output=True, text=True,
                        check=True).stdout.splitlines()
    for line in ls:
        if line.split()[0].endswith("+"):
            bad.append(f"ls shows an ACL: {line}")
    for p in paths:
        r = subprocess.run(["getfacl", "-cp", str(p)], capture_output=True, text=True)
        if r.returncode != 0:
            bad.append(f"getfacl {p} failed: {r.stderr.strip()}")
            continue
        entries = [e for e in r.stdout.split() if e and not e.startswith("#")]
        perm = stat.S_IMODE(os.lstat(p).st_mode)
        want = [f"user::{_rwx(perm >> 6)}", f"group::{_rwx(perm >> 3)}", f"other::{_rwx(perm)}"]
        if entries != want:
            bad.append(f"{p}: getfacl says {entries}, the mode {stat.filemode(perm)} says {want}")
    return bad


def _rwx(bits: int) -> str:
    return "".join(c if bits & m else "-" for c, m in (("r", 4), ("w", 2), ("x", 1)))


def compare_tools(src: Path, dst: Path, ref: Path) -> tuple[dict, dict]:
    """Run every tool into `dst` and into `ref`; ({tool: differences of modes}, {tool:
    (returncode, stderr) where dst's run failed and ref's did not})."""
    diffs, failures = {}, {}
    stages = [stage_dir_for(dst), stage_dir_for(ref)]
    try:
        for name, cmd in TOOLS:
            r_ref = run_tool(cmd, src, ref, stages[1])
            assert r_ref.returncode == 0, f"{name} into the reference failed: {r_ref.stderr}"
            r = run_tool(cmd, src, dst, stages[0])
            if r.returncode != 0:
                failures[name] = (r.returncode, r.stderr)
            got, want = modes(dst / name), modes(ref / name)
            d = {p: (_show(got.get(p)), _show(want.get(p)))
                 for p in sorted(set(got) | set(want)) if got.get(p) != want.get(p)}
            if d:
                diffs[name] = d
    finally:
        for s in stages:
            shutil.rmtree(s, ignore_errors=True)
    return diffs, failures


def _show(mode: int | None) -> str:
    return "absent" if mode is None else f"{stat.filemode(mode)} ({stat.S_IMODE(mode):o})"
