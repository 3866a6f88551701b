"""A workload for crash tests: run as `python crash_workload.py MNT JOURNAL [LIMIT]`.

File i gets one write() of data(i); every third file is fsync'd and then listed in
JOURNAL (on a local disk); every fifth step renames the previous file f<k> to r<k>, and
every seventh unlinks an older one (listed as `unlink k` before the call). It stops at
the first error (the mount died) or after LIMIT files."""

import os
import sys


def data(i: int) -> bytes:
    return (b"%d:" % i * 8000)[:20000 + i % 5000]


def main():
    mnt, journal = sys.argv[1], sys.argv[2]
    limit = int(sys.argv[3]) if len(sys.argv) > 3 else 10**9
    d = os.path.join(mnt, "w")
    os.makedirs(d, exist_ok=True)
    with open(journal, "a") as jf:
        for i in range(limit):
            try:
                fd = os.open(os.path.join(d, "f%d" % i), os.O_CREAT | os.O_WRONLY, 0o644)
                os.write(fd, data(i))
                if i % 3 == 0:
                    os.fsync(fd)
                    os.close(fd)
                    jf.write("fsync %d\n" % i)
                    jf.flush()
                else:
                    os.close(fd)
                if i % 5 == 4:
                    os.rename(os.path.join(d, "f%d" % (i - 1)), os.path.join(d, "r%d" % (i - 1)))
                if i % 7 == 6 and (i - 6) % 5 != 3:
                    jf.write("unlink %d\n" % (i - 6))
                    jf.flush()
                    os.unlink(os.path.join(d, "f%d" % (i - 6)))
            except OSError as exc:
                print(f"workload stopped at file {i}: {exc}", file=sys.stderr)
                return
        jf.write("done\n")


if __name__ == "__main__":
    main()
