#!/usr/bin/env python3
"""Steady load on embedded contextd, and where its CPU goes, per thread.

    python3 bench/halfload.py [--rate 12000] [--seconds 15] [--users 20000]

Starts `contextd run` on a fresh temp data dir, posts a generated workload
(`contextd workload`, seed 43) through the HTTP ingest API at a fixed rate
(a chunk every 50 ms), then prints the materializing stage's batch metrics,
the user-cache counters and estimate, the process's memory, snapshots and
snapshot bytes published and the CPU seconds of each contextd thread
(/proc/PID/task/*/stat). Used for the "half load" figures in BENCHMARKS.md.

With --series it also prints, per half second, the records applied, the
record latency (p50/p99 of the records applied in that half second), the
slowest materializing batch, user-cache misses and evictions, the CPU of
the materializing and RocksDB threads, and RocksDB's flushes (f) and
compactions (c) from its LOG, started (S) or ended (E): where a latency
tail comes from.
"""

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as R  # noqa: E402  (the harness's HTTP client and workload reader)


def thread_cpu(pid):
    out = collections.Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[name] += (int(fields[11]) + int(fields[12])) / R.CLK_TCK
        except OSError:
            pass
    return out


def series(samples, log_path):
    """The half-second table of --series from (time, /metrics text, thread CPU) samples."""
    logged, cf_of_job = [], {}
    try:
        with open(log_path) as f:
            for line in f:
                m = re.search(r"EVENT_LOG_v1 (\{.*\})", line)
                if m:
                    e = json.loads(m.group(1))
                    logged.append(e)
                    if "cf_name" in e:
                        cf_of_job[e.get("job")] = e["cf_name"]
    except OSError:
        pass
    events = []
    for e in logged:
        kind = e.get("event", "")
        if kind.startswith(("flush_", "compaction_")) and kind.endswith(("_started", "_finished")):
            tag = kind[0] + ("S" if kind.endswith("started") else "E")
            events.append((e["time_micros"] / 1e6, f"{tag}:{cf_of_job.get(e.get('job'), '?')}"))
    # Each sample parsed once: counter sums, the two histograms, thread CPU.
    parsed = [(t, R.parse_metrics(text)[0], dict(R.bucket_counts(text, "contextd_record_latency_seconds")),
               dict(R.bucket_counts(text, "contextd_batch_seconds", 'stage="materialize"')), cpu)
              for t, text, cpu in samples]
    print("    t  applied  p50 ms  p99 ms  slowest batch ms  misses  evictions  cpu materializer  cpu rocksdb  rocksdb")
    t_start = parsed[0][0]
    for (t0, a, la, ma, c0), (t1, b, lb, mb, c1) in zip(parsed, parsed[1:]):
        lat = sorted((k, v - la.get(k, 0)) for k, v in lb.items())
        slowest, prev = 0.0, 0.0
        for k, v in sorted((k, v - ma.get(k, 0)) for k, v in mb.items()):
            if v > prev:
                slowest = k
            prev = v

        def delta(name):
            return b.get(name, 0.0) - a.get(name, 0.0)

        applied = delta("contextd_records_applied_total")
        misses = delta("contextd_user_cache_misses_total")
        evicted = delta("contextd_user_cache_evictions_total")
        cpu = {k: c1.get(k, 0) - c0.get(k, 0) for k in c1}
        mat = sum(v for k, v in cpu.items() if k.startswith("materializer"))
        rocks = sum(v for k, v in cpu.items() if k.startswith("rocksdb"))
        p50, p99 = ((R.quantile(lat, q) * 1000 if lat and lat[-1][1] > 0 else 0) for q in (0.5, 0.99))
        evs = " ".join(e for t, e in events if t0 <= t < t1)
        print(f"  {t1 - t_start:5.1f} {applied:8.0f} {p50:7.0f} {p99:7.0f} {slowest * 1000:17.0f} {misses:7.0f} "
              f"{evicted:10.0f} {mat:17.2f} {rocks:12.2f}  {evs}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=12000, help="records/s offered")
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--users", type=int, default=20000)
    ap.add_argument("--contextd", default=os.path.join(R.CACHE, "target/release/contextd"))
    ap.add_argument("--series", action="store_true", help="print a half-second time series (see above)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="contextd-halfload-")
    try:
        records = int(args.rate * (args.seconds + 2))
        wl = os.path.join(work, "workload")
        subprocess.run([args.contextd, "workload", "--out", wl, "--records", str(records), "--users",
                        str(args.users), "--seed", "43"], check=True, capture_output=True)
        # The workload's files written back now, not by the kernel's flusher
        # 30 s later (dirty_expire_centisecs) in the middle of the measurement.
        os.sync()
        addr = f"127.0.0.1:{R.free_port()}"
        proc = subprocess.Popen([args.contextd, "run", "--data-dir", os.path.join(work, "data"), "--http-addr", addr,
                                 "--partitions", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            http = R.Http(addr)
            deadline = time.time() + 30
            while time.time() < deadline:
                try:
                    if http.request("GET", "/healthz")[0] == 200:
                        break
                except OSError:
                    time.sleep(0.1)
            with open(os.path.join(wl, "settings.json"), "rb") as f:
                http.request("PUT", "/api/admin/visibility", f.read())
            samples, sampling = [], [True]

            def sampler():
                h = R.Http(addr)
                while sampling[0]:
                    t = time.time()
                    samples.append((t, h.request("GET", "/metrics")[1].decode(), thread_cpu(proc.pid)))
                    time.sleep(max(0.0, 0.5 - (time.time() - t)))

            st = threading.Thread(target=sampler, daemon=True)
            if args.series:
                st.start()
            per_tick = max(1, int(args.rate * 0.05))
            start, tick, sent = time.time(), 0, 0
            for window in R.chunks_by_topic(os.path.join(wl, "all.tsv"), per_tick):
                for topic, values in window.items():
                    http.request("POST", f"/api/v1/topics/{topic}/records", b"\n".join(values) + b"\n",
                                 "application/x-ndjson")
                    sent += len(values)
                tick += 1
                delay = start + tick * 0.05 - time.time()
                if delay > 0:
                    time.sleep(delay)
                if time.time() - start >= args.seconds:
                    break
            elapsed = time.time() - start
            print(f"offered {args.rate:,.0f} records/s: posted {sent:,} records in {elapsed:.1f} s")
            if args.series:
                time.sleep(2)
                sampling[0] = False
                st.join()
                series(samples, os.path.join(work, "data", "state", "LOG"))
            status, body = http.request("GET", "/metrics")
            for line in body.decode().splitlines():
                if line.startswith("#"):
                    continue
                if (('stage="materialize"' in line or "record_latency" in line) and ("_sum" in line or "_count" in line)) \
                        or "user_cache" in line:
                    print("  " + line)
                elif line.startswith(("contextd_snapshots_published_total", "contextd_snapshot_bytes_total")):
                    total = float(line.split()[-1])
                    print(f"  {line}  ({total / elapsed:,.0f}/s while posting)")
            buckets = R.bucket_counts(body.decode(), "contextd_record_latency_seconds")
            if buckets:
                print("  record latency (contextd_record_latency_seconds, from the buckets): "
                      + ", ".join(f"p{int(q * 100)} {R.quantile(buckets, q) * 1000:,.0f} ms" for q in (0.5, 0.9, 0.99)))
            with open(f"/proc/{proc.pid}/status") as f:
                mem = {k: v.strip() for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}
            print(f"  memory: RSS {mem.get('VmRSS')}, peak {mem.get('VmHWM')}")
            for name, cpu in sorted(thread_cpu(proc.pid).items(), key=lambda x: -x[1]):
                if cpu >= 0.05:
                    print(f"  cpu {name:<16} {cpu:6.2f} s")
        finally:
            proc.terminate()
            proc.wait(60)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
