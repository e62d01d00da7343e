#!/usr/bin/env python3
"""CPU seconds per thread name of one process, over its whole life.

    python3 bench/thread_cpu.py PATTERN [--interval 0.25]

Waits (up to 60 s) for the newest process whose command line matches
PATTERN (`pgrep -f`; write e.g. `[c]ontextd run` so the pattern does not
match this script), samples utime + stime of each of its threads from
/proc/PID/task/*/stat every interval until it exits, and prints the last
reading per thread, summed by thread name (threads that ended are kept
at their last reading, so up to one interval of a short-lived thread is
missed). Used for BENCHMARKS.md item 40, beside e.g.
`python3 bench/run.py --records 400000 --users 20000 --snapshot-format
protobuf --only e`.
"""
import argparse
import os
import subprocess
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("pattern")
    ap.add_argument("--interval", type=float, default=0.25)
    args = ap.parse_args()
    pid = None
    deadline = time.time() + 60
    while pid is None:
        out = subprocess.run(["pgrep", "-n", "-f", args.pattern], capture_output=True, text=True).stdout.split()
        if out:
            pid = int(out[0])
        elif time.time() > deadline:
            sys.exit(f"no process matches {args.pattern!r}")
        else:
            time.sleep(0.1)
    tick = os.sysconf("SC_CLK_TCK")
    last = {}
    while os.path.exists(f"/proc/{pid}"):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            break
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    st = f.read()
            except OSError:
                continue
            name = st[st.index("(") + 1:st.rindex(")")]
            fields = st[st.rindex(")") + 2:].split()
            last[tid] = (name, int(fields[11]) + int(fields[12]))
        time.sleep(args.interval)
    by_name = {}
    for name, ticks in last.values():
        by_name[name] = by_name.get(name, 0) + ticks
    print(f"pid {pid}: CPU seconds by thread name")
    for name, ticks in sorted(by_name.items(), key=lambda x: -x[1]):
        if ticks:
            print(f"  {name:20s} {ticks / tick:7.2f}")


if __name__ == "__main__":
    main()
