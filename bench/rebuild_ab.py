#!/usr/bin/env python3
"""Alternates `contextd rebuild` runs of two or more builds (or settings) on
fresh copies of one data dir, and prints each run's phases and the medians.

    contextd demo --users 20000 --records 200000 --data-dir /tmp/pristine
    python3 bench/rebuild_ab.py --data-dir /tmp/pristine --rounds 8 \\
        old=/tmp/contextd-old new=/tmp/contextd-new \\
        'wb8=CONTEXTD_STORAGE__WRITE_BUFFER_MB=8 /tmp/contextd-new'

Each variant is LABEL=COMMAND: the contextd binary, optionally preceded by
environment assignments. A round runs every variant once, in the order
given, each on a new copy of the data dir (copied, then `sync`ed, so the
kernel's writeback of the copy does not land in the measurement).

Phases come from contextd's debug log (`CONTEXTD_LOG=contextd::replay=debug`):
the store opened (column families dropped and created), the last partition
settled, the store flushed; "final flush" is the time between the last two.
The total is what contextd prints ("in X s"), the wall time the whole
process's (exit included).
"""
import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time


def elapsed_ms(line):
    m = re.search(r"elapsed=([\d.]+)(ms|s|µs)", line)
    if not m:
        return None
    v = float(m.group(1))
    return v * {"ms": 1.0, "s": 1000.0, "µs": 0.001}[m.group(2)]


def run_once(cmd, pristine, work, partitions):
    rb = os.path.join(work, "rb")
    shutil.rmtree(rb, ignore_errors=True)
    shutil.copytree(pristine, rb)
    os.sync()
    words = shlex.split(cmd)
    env = dict(os.environ, CONTEXTD_LOG="contextd::replay=debug")
    while words and "=" in words[0] and not words[0].startswith("/"):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    args = words + ["rebuild", "--data-dir", rb]
    if partitions:
        args += ["--partitions", str(partitions)]
    t0 = time.monotonic()
    p = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    text = re.sub(r"\x1b\[[0-9;]*m", "", p.stdout + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"{cmd}: exit {p.returncode}: {text[-500:]}")
    opened = settled = flushed = None
    for line in text.splitlines():
        if "rebuild: store opened" in line:
            opened = elapsed_ms(line)
        elif "rebuild: partition settled" in line or "rebuild: partitions settled" in line:
            settled = max(settled or 0, elapsed_ms(line) or 0)
        elif "rebuild: store flushed" in line:
            flushed = elapsed_ms(line)
    m = re.search(r"in ([\d.]+)s \(", text)
    return dict(total=float(m.group(1)) if m else None, wall=wall, open=opened, settled=settled,
                final_flush=(flushed - settled) if flushed and settled else None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="the data dir to copy for each run (left as it is)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--partitions", type=int, default=None, help="passed on as --partitions")
    ap.add_argument("variants", nargs="+", help="LABEL=COMMAND (environment assignments, then the binary)")
    a = ap.parse_args()
    variants = [v.split("=", 1) for v in a.variants]
    results = {label: [] for label, _ in variants}
    with tempfile.TemporaryDirectory(prefix="rebuild-ab-") as work:
        for r in range(a.rounds):
            for label, cmd in variants:
                res = run_once(cmd, a.data_dir, work, a.partitions)
                results[label].append(res)
                print(f"round {r + 1} {label}: " + " ".join(
                    f"{k}={v:.3f}" if k in ("total", "wall") else f"{k}={v:.0f}ms"
                    for k, v in res.items() if v is not None), flush=True)
    print()
    for label, rs in results.items():
        line = [label]
        for k in ("total", "wall", "open", "final_flush"):
            vs = [x[k] for x in rs if x[k] is not None]
            if vs:
                med = statistics.median(vs)
                line.append(f"{k} median {med:.3f}s" if k in ("total", "wall") else f"{k} median {med:.0f}ms")
        totals = sorted(x["total"] for x in rs if x["total"] is not None)
        line.append("totals " + " ".join(f"{t:.2f}" for t in totals))
        print("  ".join(line))


if __name__ == "__main__":
    main()
