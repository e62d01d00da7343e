#!/usr/bin/env python3
"""How fast this machine fills the page cache: writes GiB after GiB of 1 MiB
chunks to a new file and prints each GiB's rate (wall and this thread's CPU).

    python3 bench/pagecache_write.py [--gib 6] [--dir /tmp] [--drop-behind]

With --drop-behind it starts the writeback of every 64 MiB written
(sync_file_range) and drops what was written 128 MiB before from the page
cache (POSIX_FADV_DONTNEED), so later writes reuse recently freed pages.
BENCHMARKS.md (session 8, "Dropping written log pages from the page cache")
quotes both.
"""

import argparse
import ctypes
import os
import time

SYNC_FILE_RANGE_WRITE = 2
MIB = 1 << 20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=int, default=6)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--drop-behind", action="store_true")
    args = ap.parse_args()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    buf = os.urandom(MIB)
    path = os.path.join(args.dir, f"contextd-pagecache-{os.getpid()}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        off = 0
        for g in range(args.gib):
            t, c = time.perf_counter(), time.thread_time()
            for _ in range(1024):
                os.write(fd, buf)
                off += MIB
                if args.drop_behind and off % (64 * MIB) == 0:
                    libc.sync_file_range(fd, off - 64 * MIB, 64 * MIB, SYNC_FILE_RANGE_WRITE)
                    if off >= 256 * MIB:
                        os.posix_fadvise(fd, 0, off - 128 * MIB, os.POSIX_FADV_DONTNEED)
            wall, cpu = time.perf_counter() - t, time.thread_time() - c
            print(f"GiB {g}: {1024 / wall:6.0f} MiB/s wall, {1024 / cpu:6.0f} MiB/s of CPU")
    finally:
        os.close(fd)
        os.unlink(path)


if __name__ == "__main__":
    main()
