#!/usr/bin/env python3
"""End-to-end benchmarks of contextd, side by side with a pass-through baseline
and a Quix Streams peer, on one machine in one run. See bench/README.md.

    python3 bench/run.py [--records N] [--users N] [--quick] [--only a,b,c,d,e,f]

Starts its own tansu broker(s) on free loopback ports, generates the workload
with `contextd workload`, runs every scenario and writes bench/results.md.
Benchmarks are not tests: a scenario that fails or is not available is
reported as such and the run goes on; the exit status is 0 unless the harness
itself cannot start (no contextd binary).
"""

import argparse
import datetime
import glob
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = "/root/.cache/contextd"
INPUT_TOPICS = ["zendesk.events", "sunshine.events", "sunshine.profiles"]
SETTINGS_TOPIC = "context.settings"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------ processes


def proc_cpu_seconds(pid):
    """utime + stime of a live process, from /proc/PID/stat (None once gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def proc_hwm_mb(pid):
    """Peak resident set size (VmHWM) in MiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Proc:
    """A child process we started, sampled every 0.1 s for CPU time and peak RSS."""

    def __init__(self, name, cmd, logdir, env=None, capture=False):
        self.name = name
        self.cmd = cmd
        self.log_path = os.path.join(logdir, f"{name}.log")
        self._log = open(self.log_path, "wb")
        self._ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE if capture else self._log, stderr=self._log,
                                  env=env, start_new_session=True)
        self.pid = self.p.pid
        self.samples = []  # (unix time, cpu seconds)
        self.hwm = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()

    def _sample(self):
        while not self._stop.is_set():
            cpu = proc_cpu_seconds(self.pid)
            hwm = proc_hwm_mb(self.pid)
            if cpu is not None:
                self.samples.append((time.time(), cpu))
            if hwm is not None:
                self.hwm = max(self.hwm, hwm)
            if self.p.poll() is not None:
                return
            self._stop.wait(0.1)

    def cpu_now(self):
        cpu = proc_cpu_seconds(self.pid)
        self.hwm = max(self.hwm, proc_hwm_mb(self.pid) or 0.0)
        return cpu

    def cpu_at(self, t):
        """CPU seconds used by time t (linear between samples)."""
        s = self.samples
        if not s:
            return None
        if t <= s[0][0]:
            return s[0][1]
        for (t0, c0), (t1, c1) in zip(s, s[1:]):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * (t - t0) / max(t1 - t0, 1e-9)
        return s[-1][1]

    def alive(self):
        return self.p.poll() is None

    def communicate(self, timeout):
        out, _ = self.p.communicate(timeout=timeout)
        self._stop.set()
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU of this child alone, exact at exit (children run one at a time here).
        self.total_cpu = (ru.ru_utime - self._ru0.ru_utime) + (ru.ru_stime - self._ru0.ru_stime)
        self.hwm = max(self.hwm, ru.ru_maxrss / 1024 if ru.ru_maxrss > self._ru0.ru_maxrss else 0.0)
        return out

    def cpu_until(self, t):
        """CPU seconds by time t; the exact exit total when t is past the last sample."""
        if self.samples and t <= self.samples[-1][0]:
            return self.cpu_at(t)
        return getattr(self, "total_cpu", None) or (self.samples[-1][1] if self.samples else None)

    def stop(self, timeout=30):
        """SIGTERM, then SIGKILL after `timeout` seconds. Only this process."""
        if self.p.poll() is None:
            try:
                self.p.send_signal(signal.SIGTERM)
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._stop.set()
        self._log.close()
        return self.p.returncode

    def tail(self, n=15):
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def last_json_line(text):
    for line in reversed((text or b"").decode(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None


# ------------------------------------------------------------ HTTP / metrics


class Http:
    """A keep-alive HTTP/1.1 client for one contextd."""

    def __init__(self, addr, timeout=60):
        host, port = addr.rsplit(":", 1)
        self.host, self.port, self.timeout = host, int(port), timeout
        self.c = None

    def request(self, method, path, body=None, ctype="application/json"):
        for attempt in range(2):
            if self.c is None:
                self.c = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                headers = {"Content-Type": ctype} if body is not None else {}
                self.c.request(method, path, body=body, headers=headers)
                r = self.c.getresponse()
                return r.status, r.read()
            except (OSError, http.client.HTTPException):
                self.c.close()
                self.c = None
                if attempt:
                    raise
        raise RuntimeError("unreachable")


def parse_metrics(text):
    """Prometheus text -> {name: sum over labels}, and {name: [(labels, value)]}."""
    sums, series = {}, {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m:
            continue
        try:
            v = float(m.group(3))
        except ValueError:
            continue
        sums[m.group(1)] = sums.get(m.group(1), 0.0) + v
        series.setdefault(m.group(1), []).append((m.group(2) or "", v))
    return sums, series


def label(labels, key):
    m = re.search(key + r'="([^"]*)"', labels)
    return m.group(1) if m else None


class Progress:
    """Reads contextd's counters and says when every input record has been handled.

    contextd counts records consumed by the router per input topic, records-log
    entries applied by the materializer (`applied`: user records applied, plus
    the copies of a settings record, one per partition), and dead letters by
    input topic and code. Every input record is done when the router consumed
    all of them and every records-log entry was either applied or
    dead-lettered by the materializer (not_found).
    Router-stage dead letters have every code except not_found (which the
    materializer also emits); the workload generates valid records, so this
    only matters for hand-made inputs.
    """

    def __init__(self, http, total_inputs, settings_records, partitions):
        self.http = http
        self.total = total_inputs
        self.settings = settings_records
        self.partitions = partitions

    def read(self):
        status, body = self.http.request("GET", "/metrics")
        if status != 200:
            return None
        sums, series = parse_metrics(body.decode(errors="replace"))
        consumed = sum(v for l, v in series.get("contextd_records_consumed_total", []) if label(l, "topic") in INPUT_TOPICS)
        consumed_settings = sum(v for l, v in series.get("contextd_records_consumed_total", []) if label(l, "topic") == SETTINGS_TOPIC)
        dl = series.get("contextd_records_dead_lettered_total", [])
        router_dl = sum(v for l, v in dl if label(l, "code") != "not_found")
        materializer_dl = sum(v for l, v in dl if label(l, "code") == "not_found")
        batches = {}
        for name in ("contextd_batch_seconds_sum", "contextd_batch_seconds_count", "contextd_batch_records_sum", "contextd_batch_records_count"):
            for l, v in series.get(name, []):
                batches[f"{name.replace('contextd_batch_', '')}:{label(l, 'stage')}"] = v
        return {
            "batches": batches,
            "consumed": consumed,
            "consumed_settings": consumed_settings,
            "applied": sums.get("contextd_records_applied_total", 0.0),
            "dead_lettered": sums.get("contextd_records_dead_lettered_total", 0.0),
            "router_dead_lettered": router_dl,
            "materializer_dead_lettered": materializer_dl,
            "snapshots": sums.get("contextd_snapshots_published_total", 0.0),
            "snapshot_bytes": sums.get("contextd_snapshot_bytes_total", 0.0),
            "conflicts": sums.get("contextd_identity_conflicts_total", 0.0),
        }

    def done(self, m):
        if m is None or m["consumed"] < self.total or m["consumed_settings"] < self.settings:
            return False
        # Each settings record is applied once per partition.
        want = self.total - m["router_dead_lettered"] + self.settings * self.partitions
        return m["applied"] + m["materializer_dead_lettered"] >= want


def batch_summary(m):
    """Per stage: batches, mean records per batch, mean seconds per batch (from /metrics)."""
    out = {}
    b = (m or {}).get("batches", {})
    for key, count in b.items():
        if key.startswith("seconds_count:"):
            stage = key.split(":", 1)[1]
            out[stage] = {"batches": count, "mean_ms": round(b.get(f"seconds_sum:{stage}", 0) / max(count, 1) * 1000, 2)}
            if f"records_count:{stage}" in b:
                out[stage]["mean_records"] = round(b[f"records_sum:{stage}"] / max(b[f"records_count:{stage}"], 1), 1)
    return out


def wait_done(proc, progress, timeout, stall=60.0, poll=0.1):
    """Polls until done; returns (metrics, first-consumed time, done time, note)."""
    end = time.time() + timeout
    first = None
    last_change, last_key = time.time(), None
    m = None
    while time.time() < end:
        if not proc.alive():
            return m, first, time.time(), f"contextd exited with status {proc.p.returncode}: {proc.tail(5).strip()}"
        try:
            m = progress.read()
        except OSError:
            m = None
        now = time.time()
        if m is not None:
            if first is None and m["consumed"] > 0:
                first = now - poll / 2
            if progress.done(m):
                return m, first, now, None
            key = (m["consumed"], m["applied"], m["dead_lettered"])
            if key != last_key:
                last_key, last_change = key, now
            elif now - last_change > stall:
                return m, first, now, f"stalled for {stall:.0f}s at consumed={m['consumed']:.0f} applied={m['applied']:.0f}"
        time.sleep(poll)
    return m, first, time.time(), f"timed out after {timeout:.0f}s"


# ------------------------------------------------------------ helpers


def read_tsv(path):
    with open(path, "rb") as f:
        for line in f:
            line = line.rstrip(b"\n")
            if line:
                topic, key, value = line.split(b"\t", 2)
                yield topic.decode(), key, value


def chunks_by_topic(path, size):
    """Windows of `size` lines of all.tsv, split per topic (order kept within a topic)."""
    window = {}
    n = 0
    for topic, _key, value in read_tsv(path):
        window.setdefault(topic, []).append(value)
        n += 1
        if n == size:
            yield window
            window, n = {}, 0
    if window:
        yield window


def start_contextd(args, name, data_dir, http_addr, logdir, extra=()):
    cmd = [args.contextd, "run", "--data-dir", data_dir, "--http-addr", http_addr,
           "--partitions", str(args.partitions), "--snapshot-format", args.snapshot_format, *extra]
    env = dict(os.environ, CONTEXTD_LOG=os.environ.get("CONTEXTD_LOG", "warn"))
    return Proc(name, cmd, logdir, env=env)


def wait_http(http, proc, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        if not proc.alive():
            return False
        try:
            status, _ = http.request("GET", "/healthz")
            if status == 200:
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def per_million(cpu, records):
    return cpu / records * 1e6 if cpu is not None and records else None


def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram": mem, "kernel": platform.release(),
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


# ------------------------------------------------------------ broker


class Broker:
    """A tansu broker with in-memory storage on a free loopback port."""

    def __init__(self, args, logdir, name):
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = Proc(name, [args.tansu, "broker", "--listener-url", url, "--advertised-listener-url", url,
                                "--storage-engine", "memory://tansu/"], logdir)
        if not wait_port(self.port, 30):
            raise RuntimeError(f"tansu did not listen on {self.addr}: {self.proc.tail()}")

    def create_topics(self, names, partitions, compacted=()):
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.addr})
        # Explicit retention: tansu returns only the configs a topic was created
        # with, and Quix Streams needs retention.ms to derive its internal topics.
        base = {"retention.ms": "-1", "retention.bytes": "-1"}
        new = [NewTopic(t, num_partitions=partitions, replication_factor=1,
                        config=dict(base, **{"cleanup.policy": "compact"}) if t in compacted else base) for t in names]
        for t, f in admin.create_topics(new, operation_timeout=30).items():
            try:
                f.result(60)
            except Exception as e:  # an existing topic is fine
                if "already exists" not in str(e).lower() and "TOPIC_ALREADY_EXISTS" not in str(e):
                    raise

    def load(self, args, wl, logdir, settings=True, inputs=True):
        """Settings first, then all.tsv, with `passthrough produce` (either alone:
        `settings`, `inputs`). Returns its JSON line."""
        cmd = [args.passthrough, "produce", "--brokers", self.addr, "--file", wl["tsv"] if inputs else os.devnull]
        if settings:
            cmd += ["--settings", wl["settings"]]
        p = Proc("produce" if inputs else "produce-settings", cmd, logdir, capture=True)
        out = p.communicate(timeout=3600)
        r = last_json_line(out)
        if p.p.returncode != 0 or r is None:
            raise RuntimeError(f"loading the inputs failed: {p.tail()}")
        if r["records"] != (wl["records"] if inputs else 0):
            raise RuntimeError(f"loaded {r['records']} records, expected {wl['records']}")
        r["cpu_s"] = p.cpu_until(float("inf"))
        return r

    def stop(self):
        self.proc.stop(10)


# ------------------------------------------------------------ scenarios


def scenario_embedded(args, wl, work, logdir, rep):
    """(a) contextd embedded, end to end through the HTTP ingest API."""
    data = os.path.join(work, f"embedded-{rep}")
    addr = f"127.0.0.1:{free_port()}"
    proc = start_contextd(args, f"contextd-embedded-{rep}", data, addr, logdir)
    http = Http(addr)
    res = {"scenario": "contextd embedded (HTTP ingest, end to end)", "records": wl["records"], "data_dir": data}
    try:
        if not wait_http(http, proc):
            return dict(res, error=f"contextd did not start: {proc.tail()}")
        with open(wl["settings"], "rb") as f:
            status, body = http.request("PUT", "/api/admin/visibility", f.read())
        if status >= 300:
            return dict(res, error=f"PUT /api/admin/visibility answered {status}: {body[:200]!r}")
        progress = Progress(Http(addr), wl["records"], 1, args.partitions)
        # The request bodies are made before the clock starts, as the Kafka
        # scenarios load their topics first: reading and splitting the
        # workload file in Python took about 0.4 CPU s of the two cores
        # during the run (BENCHMARKS.md item 68). (b) does the same.
        bodies = [(topic, b"\n".join(values) + b"\n")
                  for window in chunks_by_topic(wl["tsv"], args.chunk) for topic, values in window.items()]
        cpu0, t0 = proc.cpu_now(), time.time()
        loaded = {}

        def loader():
            try:
                for topic, body in bodies:
                    st, b = http.request("POST", f"/api/v1/topics/{topic}/records", body, "application/x-ndjson")
                    if st >= 300:
                        loaded["error"] = f"POST records to {topic} answered {st}: {b[:200]!r}"
                        return
                loaded["seconds"] = time.time() - t0
            except Exception as e:  # reported, never raised
                loaded["error"] = f"loader failed: {e}"

        lt = threading.Thread(target=loader, daemon=True)
        lt.start()
        m, _first, t1, note = wait_done(proc, progress, args.timeout)
        cpu1 = proc.cpu_now()
        lt.join(5)
        secs = t1 - t0
        res.update(seconds=secs, records_per_s=wl["records"] / secs, load_seconds=loaded.get("seconds"),
                   cpu_s=cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None,
                   peak_rss_mb=proc.hwm, metrics=m)
        if m:
            res.update(snapshots=m["snapshots"], snapshot_bytes=m["snapshot_bytes"],
                       snapshots_per_s=m["snapshots"] / secs, snapshot_bytes_per_s=m["snapshot_bytes"] / secs,
                       dead_letters=m["dead_lettered"], identity_conflicts=m["conflicts"], batches=batch_summary(m))
        if loaded.get("error") or note:
            res["error"] = loaded.get("error") or note
        elif loaded.get("seconds") and loaded["seconds"] > 0.9 * secs:
            res["note"] = "the HTTP loader was the bottleneck (posting took {:.1f}s of {:.1f}s)".format(loaded["seconds"], secs)
        return res
    finally:
        res["exit_status"] = proc.stop(60)


def digest_of(args, data):
    """`contextd digest` of a data dir (offline), or None."""
    r = subprocess.run([args.contextd, "digest", "--data-dir", data, "--partitions", str(args.partitions)],
                       capture_output=True, timeout=600)
    return r.stdout.decode().strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else None


def measure_rebuild(args, name, label, cmd, logdir, data, before):
    """Runs a `contextd rebuild` command line; its records-log entries, seconds
    and rate as contextd prints them (embedded and Kafka mode alike), CPU, peak
    RSS, and whether the digest afterwards equals `before`."""
    res = {"scenario": name}
    p = Proc(label, cmd, logdir, capture=True)
    try:
        text = p.communicate(timeout=args.timeout).decode(errors="replace")
    except subprocess.TimeoutExpired:
        p.stop()
        return dict(res, error="timed out")
    m = re.search(r"(\d+) records replayed(?: \((\d+) input records re-routed\))?.*?in ([\d.]+)s "
                  r"\(([\d.]+) records(?:-log entries)?/s\)", text)
    if p.p.returncode != 0 or not m:
        return dict(res, error=f"exit {p.p.returncode}: {(text + p.tail()).strip()[-300:]}")
    after = digest_of(args, data)
    # With --from-inputs, each input record is routed and then replayed: the rate
    # here is records-log entries per second in every case (as contextd prints it).
    secs = float(m.group(3))
    res.update(records=int(m.group(1)), seconds=secs, records_per_s=int(m.group(1)) / max(secs, 1e-9),
               printed_records_per_s=float(m.group(4)), rerouted=int(m.group(2)) if m.group(2) else None,
               cpu_s=p.cpu_until(float("inf")), peak_rss_mb=p.hwm, output=text.strip().splitlines()[-1],
               digest_before=before, digest_after=after, digest_match=(before is not None and before == after))
    if not res["digest_match"]:
        res["note"] = "digest after rebuild differs from the live run's" if before and after else "digest not available"
    return res


def scenario_rebuild(args, data, logdir):
    """(f) `contextd rebuild` (and --from-inputs) of the data dir of (a), digests compared."""
    before = digest_of(args, data)
    return [measure_rebuild(args, "contextd rebuild" + (" --from-inputs" if variant else ""),
                            "rebuild" + ("-from-inputs" if variant else ""),
                            [args.contextd, "rebuild", "--data-dir", data, "--partitions", str(args.partitions),
                             "--snapshot-format", args.snapshot_format, *variant],
                            logdir, data, before)
            for variant in ([], ["--from-inputs"])]


def generate_workload(args, out, records, seed):
    """`contextd workload` into `out`, its files then written back (`sync`):
    left dirty, the kernel's flusher writes them back 30 s later
    (`vm.dirty_expire_centisecs`), all at once and in the middle of a
    measurement (1.6 GB for the latency scenario's workload: a stall of a
    second or more in contextd's own writes)."""
    r = subprocess.run([args.contextd, "workload", "--out", out, "--records", str(records), "--users", str(args.users),
                        "--seed", str(seed)], capture_output=True)
    os.sync()
    return r


def latency_workload(args, work, offered):
    """A fresh workload (seed + 1) long enough for the warm-up and the probe window."""
    n = int(offered * (args.latency_seconds + 5)) + 1000
    d = os.path.join(work, "workload-latency")
    r = generate_workload(args, d, n, args.seed + 1)
    if r.returncode != 0:
        return None
    return {"tsv": os.path.join(d, "all.tsv"), "settings": os.path.join(d, "settings.json"), "records": n}


def bucket_counts(text, name, label=""):
    """[(upper bound, cumulative count)] of a Prometheus histogram in /metrics text
    (the series whose labels contain `label`, e.g. 'stage="materialize"')."""
    out = []
    for line in text.splitlines():
        if line.startswith(name + "_bucket{") and label in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    return sorted(out)


def quantile(buckets, q):
    """Prometheus' histogram_quantile: linear within the bucket holding rank q."""
    total = buckets[-1][1]
    rank, lower, below = q * total, 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = upper, count
    return lower


def record_latency(http, settle_s=30.0):
    """Quantiles of contextd_record_latency_seconds (every record applied), read
    once its count has stopped growing (the backlog applied) or after settle_s."""
    last, stable_since, deadline = -1.0, time.time(), time.time() + settle_s
    buckets = []
    while time.time() < deadline:
        st, b = http.request("GET", "/metrics")
        buckets = bucket_counts(b.decode(), "contextd_record_latency_seconds") if st == 200 else []
        count = buckets[-1][1] if buckets else 0.0
        if count != last:
            last, stable_since = count, time.time()
        elif time.time() - stable_since > 0.5:
            break
        time.sleep(0.1)
    if not buckets or buckets[-1][1] == 0:
        return {}
    return {"records_measured": int(buckets[-1][1]),
            "record_p50_ms": quantile(buckets, 0.5) * 1000, "record_p90_ms": quantile(buckets, 0.9) * 1000,
            "record_p99_ms": quantile(buckets, 0.99) * 1000}


def scenario_latency(args, wl, work, logdir, offered):
    """(b) record-to-snapshot latency in embedded mode at a fixed offered load.

    A loader thread posts a workload (generated for this scenario with seed + 1,
    long enough for the window) through the HTTP ingest API at `offered` records/s (a chunk every 50 ms). Meanwhile a probe posts one
    custom event every `--probe-interval` seconds for one of ten probe users
    (`POST /api/v2/users/{id}/events`, a shown type, a unique id, created_at
    later than anything else of that user), then polls
    `GET /api/v2/users/{id}/context` every millisecond until that event is the
    newest in the snapshot. Latency = from sending the POST to the first GET
    that shows it: HTTP append + routing + materializing + snapshot commit +
    up to ~1 ms polling and one GET. One probe is in flight at a time.
    """
    wl = latency_workload(args, work, offered) or wl
    data = os.path.join(work, "latency")
    addr = f"127.0.0.1:{free_port()}"
    proc = start_contextd(args, "contextd-latency", data, addr, logdir)
    http = Http(addr)
    res = {"scenario": "contextd embedded latency", "offered_records_per_s": offered}
    try:
        if not wait_http(http, proc):
            return dict(res, error=f"contextd did not start: {proc.tail()}")
        with open(wl["settings"], "rb") as f:
            http.request("PUT", "/api/admin/visibility", f.read())
        stop = threading.Event()
        sent = {"records": 0, "behind": 0.0, "error": None}
        duration = args.latency_seconds
        per_tick = max(1, int(offered * 0.05))
        # Each tick's request bodies are made before the run, as in (a): the
        # load generator shares the two cores with contextd.
        ticks = [[(topic, b"\n".join(values) + b"\n", len(values)) for topic, values in window.items()]
                 for window in chunks_by_topic(wl["tsv"], per_tick)]

        def loader():
            h = Http(addr)
            start = time.time()
            tick = 0
            try:
                for bodies in ticks:
                    if stop.is_set():
                        return
                    for topic, body, n in bodies:
                        st, b = h.request("POST", f"/api/v1/topics/{topic}/records", body, "application/x-ndjson")
                        if st >= 300:
                            sent["error"] = f"loader: {topic} answered {st}"
                            return
                        sent["records"] += n
                    tick += 1
                    delay = start + tick * 0.05 - time.time()
                    if delay > 0:
                        time.sleep(delay)
                    else:
                        sent["behind"] = max(sent["behind"], -delay)
            except Exception as e:
                sent["error"] = f"loader failed: {e}"

        lt = threading.Thread(target=loader, daemon=True)
        t_start = time.time()
        lt.start()
        time.sleep(min(2.0, duration / 5))  # let the pipeline reach a steady state
        lat, appends, timeouts, i = [], [], 0, 0
        base = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
        run_id = f"{int(time.time())}"
        end = time.time() + duration
        while time.time() < end and lt.is_alive():
            i += 1
            uid = f"bench-probe-{i % 10}"
            eid = f"probe-{run_id}-{i}"
            created = (base + datetime.timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%SZ")
            body = json.dumps({"profile": {"source": "shopify", "type": "customer", "name": "Probe",
                                           "identifiers": [{"type": "external_id", "value": uid}]},
                               "event": {"id": eid, "source": "shopify", "type": "order_completed",
                                         "description": "latency probe", "created_at": created,
                                         "properties": {"probe": i}}}).encode()
            t0 = time.perf_counter()
            st, b = http.request("POST", f"/api/v2/users/{uid}/events", body)
            appends.append((time.perf_counter() - t0) * 1000)
            if st != 202:
                res["error"] = f"probe POST answered {st}: {b[:200]!r}"
                break
            seen = None
            deadline = t0 + 10
            while time.perf_counter() < deadline:
                st, b = http.request("GET", f"/api/v2/users/{uid}/context")
                if st == 200:
                    ev = json.loads(b).get("events") or []
                    if ev and ev[0].get("id") == eid:
                        seen = time.perf_counter()
                        break
                time.sleep(0.001)
            if seen is None:
                timeouts += 1
            else:
                lat.append((seen - t0) * 1000)
            time.sleep(max(0.0, args.probe_interval - (time.perf_counter() - t0)))
        stop.set()
        lt.join(10)
        elapsed = time.time() - t_start
        res.update(record_latency(http))
        res.update(samples=len(lat), timeouts=timeouts, achieved_records_per_s=sent["records"] / max(elapsed, 1e-9),
                   loader_max_behind_s=sent["behind"])
        if lat:
            lat.sort()
            q = lambda p: lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))]
            res.update(p50_ms=q(0.5), p90_ms=q(0.9), p99_ms=q(0.99), max_ms=lat[-1], mean_ms=statistics.mean(lat))
            appends.sort()
            res.update(append_p50_ms=appends[len(appends) // 2], append_p99_ms=appends[min(len(appends) - 1, int(round(0.99 * (len(appends) - 1))))])
        if sent["error"]:
            res["error"] = sent["error"]
        elif not lt.is_alive() and elapsed < duration:
            res["note"] = "the workload ran out before the probe window ended"
        return res
    finally:
        proc.stop(60)


def settle_machine(work, keep):
    """Deletes the finished embedded scenarios' data dirs under `work` (their
    dirty pages are dropped, not written back; kept with --keep) and waits
    for the rest of the page cache's writeback (`sync`), so the next
    scenario does not share the disk and the cores with the kernel writing
    back the last one's files."""
    if not keep:
        for d in glob.glob(os.path.join(work, "embedded-*")) + [os.path.join(work, "latency")]:
            shutil.rmtree(d, ignore_errors=True)
    t0 = time.time()
    os.sync()
    log(f"    (embedded data dirs {'kept' if keep else 'removed'}, synced in {time.time() - t0:.1f} s)")


def run_on_broker(args, wl, logdir, label_, fn, settings_first=False):
    """Fresh broker, topics, inputs loaded; then fn(broker). Stops the broker.
    With `settings_first` only the settings are loaded before fn(broker, load_inputs),
    which calls load_inputs() once its consumer has processed them."""
    try:
        broker = Broker(args, logdir, f"tansu-{label_}")
    except Exception as e:
        return [{"scenario": label_, "error": f"broker: {e}"}], None
    try:
        broker.create_topics(INPUT_TOPICS + [SETTINGS_TOPIC], args.partitions, compacted=[SETTINGS_TOPIC])
        if settings_first:
            broker.load(args, wl, logdir, inputs=False)
            loaded = {}

            def load_inputs():
                loaded.update(broker.load(args, wl, logdir, settings=False))

            rows = fn(broker, load_inputs)
            load = dict(loaded, scenario="passthrough produce (input loader)", broker_cpu_s=None) if loaded else None
            return rows, load
        load = broker.load(args, wl, logdir)
        load.update(scenario="passthrough produce (input loader)", broker_cpu_s=None)
        return fn(broker), load
    except Exception as e:
        return [{"scenario": label_, "error": str(e)}], None
    finally:
        broker.stop()


def measured_child(name, cmd, logdir, broker, timeout, env=None, after_start=None):
    """Runs a self-stopping benchmark child; returns (its JSON line, Proc) with CPU of its window.
    `after_start(proc)` runs once it has started (e.g. loads the inputs once it is ready)."""
    b_cpu0 = broker.proc.cpu_now()
    p = Proc(name, cmd, logdir, env=env, capture=True)
    if after_start is not None:
        try:
            after_start(p)
        except Exception as e:
            p.stop()
            return {"error": f"{e}: {p.tail()}"}, p
    try:
        out = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.stop()
        return {"error": f"timed out after {timeout}s: {p.tail()}"}, p
    r = last_json_line(out)
    if p.p.returncode != 0 or r is None:
        return {"error": f"exit {p.p.returncode}: {p.tail()}"}, p
    c0 = p.cpu_at(r["t_start"]) if r.get("t_start") else 0.0
    total = p.cpu_until(float("inf"))
    c1 = p.cpu_until(r["t_end"]) if r.get("t_end") else total
    r["cpu_s"] = (c1 - c0) if c0 is not None and c1 is not None else total
    r["cpu_total_s"] = total
    r["peak_rss_mb"] = p.hwm
    b_cpu1 = broker.proc.cpu_now()
    r["broker_cpu_s"] = (b_cpu1 - b_cpu0) if b_cpu0 is not None and b_cpu1 is not None else None
    return r, p


def scenario_baselines(args, wl, logdir, snapshot_bytes):
    """(c) consume-only and pass-through on tansu."""

    def fn(broker):
        rows = []
        group = f"bench-{int(time.time())}"
        r, _ = measured_child("consume-only", [args.passthrough, "run", "--brokers", broker.addr, "--group", group + "-co",
                                               "--consume-only", "--expect", str(wl["records"])], logdir, broker, args.timeout)
        rows.append(dict(r, scenario="consume-only (rdkafka BaseConsumer)"))
        broker.create_topics(["passthrough.records", "passthrough.snapshots"], args.partitions)
        r, _ = measured_child("passthrough", [args.passthrough, "run", "--brokers", broker.addr, "--group", group + "-pt",
                                              "--expect", str(wl["records"]), "--snapshot-bytes", str(int(snapshot_bytes))],
                              logdir, broker, args.timeout)
        r = dict(r, scenario=f"pass-through, 2 stages, {int(snapshot_bytes)} B stand-in snapshots")
        if "stage2_snapshots" in r:
            r.update(snapshots=r["stage2_snapshots"], snapshot_bytes=r["stage2_snapshot_bytes"],
                     snapshots_per_s=r["stage2_snapshots"] / r["seconds"], snapshot_bytes_per_s=r["stage2_snapshot_bytes"] / r["seconds"])
        rows.append(r)
        return rows

    return run_on_broker(args, wl, logdir, "baselines", fn)


def scenario_quix(args, wl, logdir, work, rep):
    """(d) the Quix Streams peer on tansu."""

    def fn(broker, load_inputs):
        state = os.path.join(work, f"quix-state-{rep}")
        ready = os.path.join(work, f"quix-ready-{rep}")
        cmd = [sys.executable, os.path.join(HERE, "peers", "quix_peer.py"), "--brokers", broker.addr,
               "--group", f"quix-{int(time.time())}", "--output-topic", "peer.snapshots", "--dlq-topic", "peer.dlq",
               "--partitions", str(args.partitions), "--state-dir", state, "--idle-exit", str(args.idle_exit),
               "--ready-file", ready]
        if args.quix_no_changelog:
            cmd.append("--no-changelog")

        def settings_then_inputs(proc):
            # As contextd's routing stage does (and Kafka Streams with a global
            # table), the peer applies the settings before the inputs: the
            # inputs are loaded once it has processed the settings record.
            # Loaded together, Kafka orders nothing across topics, and the
            # peer processed 50%+ of the inputs first in some runs: nothing
            # shown, no snapshots for those (session 22).
            deadline = time.time() + 300
            while not os.path.exists(ready):
                if proc.p.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the peer did not process the settings record")
                time.sleep(0.05)
            load_inputs()

        r, _ = measured_child(f"quix-{rep}", cmd, logdir, broker, args.timeout, after_start=settings_then_inputs)
        r = dict(r, scenario="Quix Streams peer (RocksDB state, changelog {})".format("off" if args.quix_no_changelog else "on"))
        if "snapshots" in r and r.get("seconds"):
            r.update(snapshots_per_s=r["snapshots"] / r["seconds"], snapshot_bytes_per_s=r["snapshot_bytes"] / r["seconds"])
        if "records" in r and r["records"] != wl["records"]:
            r["note"] = f"processed {r['records']} of {wl['records']} input records"
        return [r]

    return run_on_broker(args, wl, logdir, f"quix-{rep}", fn, settings_first=True)


def scenario_contextd_kafka(args, wl, logdir, work, rep):
    """(e) contextd in Kafka mode on tansu."""

    def fn(broker):
        data = os.path.join(work, f"kafka-{rep}")
        addr = f"127.0.0.1:{free_port()}"
        # The same fetch wait as the pass-through and the peer: tansu answers
        # every fetch after fetch.wait.max.ms, whatever it holds (contextd's
        # default, 50 ms, is for real brokers, which answer as data arrives).
        cfg = os.path.join(work, "contextd-tansu.toml")
        with open(cfg, "w") as f:
            f.write('[kafka.consumer]\n"fetch.wait.max.ms" = "10"\n')
        proc = start_contextd(args, f"contextd-kafka-{rep}", data, addr, logdir,
                              extra=["--config", cfg, "--brokers", broker.addr,
                                     "--group-id", f"contextd-{int(time.time())}"])
        res = {"scenario": "contextd Kafka mode", "records": wl["records"]}
        try:
            http = Http(addr)
            if not wait_http(http, proc):
                tail = proc.tail(5).strip()
                if "not available" in tail:
                    return [dict(res, unavailable=True, error="not available in this build: " + tail.splitlines()[-1])]
                return [dict(res, error=f"contextd did not start: {tail}")]
            b_cpu0 = broker.proc.cpu_now()
            progress = Progress(http, wl["records"], 1, args.partitions)
            m, first, t1, note = wait_done(proc, progress, args.timeout, stall=max(60.0, args.idle_exit * 4))
            cpu1 = proc.cpu_now()
            if first is None:
                return [dict(res, error=note or "no record consumed")]
            c0 = proc.cpu_at(first)
            secs = t1 - first
            res.update(seconds=secs, records_per_s=wl["records"] / secs, cpu_s=(cpu1 - c0) if c0 is not None and cpu1 is not None else None,
                       peak_rss_mb=proc.hwm, metrics=m, broker_cpu_s=(broker.proc.cpu_now() or 0) - (b_cpu0 or 0))
            if m:
                res.update(snapshots=m["snapshots"], snapshot_bytes=m["snapshot_bytes"], snapshots_per_s=m["snapshots"] / secs,
                           snapshot_bytes_per_s=m["snapshot_bytes"] / secs, dead_letters=m["dead_lettered"],
                           identity_conflicts=m["conflicts"], batches=batch_summary(m))
            if note:
                res["error"] = note
                return [res]
            # (e) then rebuilds its data dir from the records topic while the
            # broker is up: the restore path a partition assignment takes.
            proc.stop(60)
            before = digest_of(args, data)
            res["rebuild"] = measure_rebuild(
                args, "contextd rebuild --brokers", f"rebuild-kafka-{rep}",
                [args.contextd, "rebuild", "--data-dir", data, "--partitions", str(args.partitions),
                 "--snapshot-format", args.snapshot_format, "--config", cfg, "--brokers", broker.addr],
                logdir, data, before)
            return [res]
        finally:
            proc.stop(60)

    return run_on_broker(args, wl, logdir, f"contextd-kafka-{rep}", fn)


# ------------------------------------------------------------ report


def fmt(v, unit="", digits=0):
    if v is None:
        return "–"
    if isinstance(v, float) and digits == 0:
        return f"{v:,.0f}{unit}"
    return f"{v:,.{digits}f}{unit}"


def median_row(rows):
    """Median of each numeric field over repetitions (errors kept if all failed)."""
    ok = [r for r in rows if not r.get("error")]
    if not ok:
        return rows[-1]
    out = dict(ok[0])
    for k, v in ok[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = [r[k] for r in ok if isinstance(r.get(k), (int, float))]
            out[k] = statistics.median(vals)
    out["repetitions"] = len(ok)
    if len(ok) > 1:
        out["records_per_s_all"] = [round(r.get("records_per_s") or 0) for r in ok]
    return out


def report(args, mach, wl, rows, latency, rebuilds, load_rows, started, path):
    L = []
    L.append("# contextd benchmark results\n")
    L.append(f"Generated by `{' '.join(['python3', 'bench/run.py'] + sys.argv[1:])}` on {mach['date']} "
             f"(run took {(time.time() - started) / 60:.1f} min).\n")
    L.append("## Machine\n")
    L.append(f"- {mach['nproc']} CPUs: {mach['cpu']}\n- RAM: {mach['ram']}\n- kernel {mach['kernel']}, Python {mach['python']}\n"
             f"- broker: tansu (`{args.tansu}`), in-memory storage, one per scenario group, on loopback\n")
    L.append("## Workload\n")
    L.append(f"`contextd workload --records {wl['records']} --users {wl['users']} --seed {args.seed}`: "
             f"{wl['records']:,} input records ({wl['bytes'] / 1e6:,.1f} MB of values; ~70% Zendesk events, ~25% custom events, "
             f"~5% profile operations, Zipf users), plus one visibility settings record that shows every generated type. "
             f"{args.partitions} partitions per topic; snapshots as {args.snapshot_format}; "
             f"repetitions per throughput scenario: {args.repeat} (medians shown).\n")
    L.append("## Throughput\n")
    L.append("| scenario | records | seconds | records/s | snapshots/s | snapshot MB/s | CPU s / 1M records | peak RSS MiB | broker CPU s / 1M | notes |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows + load_rows:
        notes = r.get("error") or r.get("note") or ""
        if r.get("records_per_s_all"):
            notes = (notes + " " if notes else "") + "runs: " + ", ".join(f"{x:,}" for x in r["records_per_s_all"])
        recs = r.get("records")
        L.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["scenario"], fmt(float(recs)) if recs else "–", fmt(r.get("seconds"), digits=2), fmt(r.get("records_per_s")),
            fmt(r.get("snapshots_per_s")), fmt((r.get("snapshot_bytes_per_s") or 0) / 1e6, digits=1) if r.get("snapshot_bytes_per_s") else "–",
            fmt(per_million(r.get("cpu_s"), recs), digits=1), fmt(r.get("peak_rss_mb")),
            fmt(per_million(r.get("broker_cpu_s"), recs), digits=1), notes.replace("|", "/").replace("\n", " ")[:300]))
    L.append("")
    # Ratios measured side by side
    by = {}
    for r in rows:
        if r.get("records_per_s") and not r.get("error"):
            by[r["scenario"].split(" (")[0].split(",")[0]] = r
    pairs = [("contextd Kafka mode", "Quix Streams peer"), ("contextd Kafka mode", "pass-through"),
             ("contextd Kafka mode", "consume-only"), ("contextd embedded", "Quix Streams peer"),
             ("contextd embedded", "pass-through"), ("Quix Streams peer", "pass-through"), ("pass-through", "consume-only")]
    ratio_lines = []
    for a, b in pairs:
        if a in by and b in by:
            ra, rb = by[a], by[b]
            cpu = ""
            ca, cb = per_million(ra.get("cpu_s"), ra.get("records")), per_million(rb.get("cpu_s"), rb.get("records"))
            if ca and cb:
                cpu = f"; CPU per record {ca / cb:.2f}x"
            ratio_lines.append(f"- {a} / {b}: throughput {ra['records_per_s'] / rb['records_per_s']:.2f}x{cpu}")
    L.append("## Ratios (same run, same machine)\n")
    L.append("\n".join(ratio_lines) if ratio_lines else "No pair of scenarios completed in this run.")
    L.append("")
    L.append("## Record-to-snapshot latency (embedded)\n")
    if latency:
        if latency.get("p50_ms") is not None:
            L.append("| offered records/s | achieved records/s | probes | p50 ms | p90 ms | p99 ms | max ms | of which the POST (p50 / p99 ms) | notes |")
            L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
            L.append(f"| {fmt(float(latency['offered_records_per_s']))} | {fmt(latency.get('achieved_records_per_s'))} | "
                     f"{latency['samples']} (+{latency['timeouts']} timed out) | {latency['p50_ms']:.1f} | {latency['p90_ms']:.1f} | "
                     f"{latency['p99_ms']:.1f} | {latency['max_ms']:.1f} | {latency['append_p50_ms']:.1f} / {latency['append_p99_ms']:.1f} | "
                     f"{latency.get('error') or latency.get('note') or ''} |")
        else:
            L.append(f"Not measured: {latency.get('error') or latency.get('note')}")
        L.append("\nMethod: a loader posts a workload to the HTTP ingest API at the offered rate (by default half the "
                 "records/s measured in the embedded scenario) while a probe posts one event at a time for ten probe users "
                 "and polls their context every ms until the event is the newest shown; latency covers HTTP append, "
                 "routing, materializing and the snapshot commit, plus up to ~1 ms of polling.\n")
        if latency.get("record_p50_ms") is not None:
            L.append(f"Over every record applied in this scenario ({fmt(latency['records_measured'])} records; "
                     f"contextd's `contextd_record_latency_seconds` histogram, from the append's timestamp to the "
                     f"commit of the record's batch, quantiles interpolated within its buckets as Prometheus' "
                     f"`histogram_quantile` does): p50 {latency['record_p50_ms']:.0f} ms, "
                     f"p90 {latency['record_p90_ms']:.0f} ms, p99 {latency['record_p99_ms']:.0f} ms.\n")
    else:
        L.append("Not run.\n")
    L.append("## Rebuild\n")
    if rebuilds:
        L.append("| command | records-log entries | seconds | records/s | CPU s / 1M | peak RSS MiB | digest equals live run | notes |")
        L.append("|---|---:|---:|---:|---:|---:|---|---|")
        for r in rebuilds:
            L.append("| `{}` | {} | {} | {} | {} | {} | {} | {} |".format(
                r["scenario"], fmt(float(r["records"])) if r.get("records") else "–", fmt(r.get("seconds"), digits=2),
                fmt(r.get("records_per_s")), fmt(per_million(r.get("cpu_s"), r.get("records")), digits=1), fmt(r.get("peak_rss_mb")),
                {True: "yes", False: "no"}.get(r.get("digest_match"), "–"), (r.get("error") or r.get("note") or "").replace("|", "/")[:300]))
    else:
        L.append("Not run.")
    L.append("")
    L.append("## How each figure is measured\n")
    L.append("- records/s: input records / wall seconds from the first input record consumed (Kafka scenarios) or the first "
             "HTTP append (embedded) until every input record is processed: contextd's counters (`/metrics`) show every "
             "record consumed and every records-log entry materialized; the peers report their own window (first input "
             "record to last message handled, or to the last delivery for the pass-through).")
    L.append("- CPU s / 1M records: utime+stime of the measured process (from /proc/PID/stat, sampled every 0.1 s) over that "
             "window, per million input records; broker CPU is tansu's over the same scenario. peak RSS: VmHWM.")
    L.append("- contextd publishes a snapshot only when the visible context changes, and one per user per batch; the Quix "
             "peer one per record that changes it; the pass-through one per input record.")
    L.append("- Inputs are loaded into a fresh broker with `passthrough produce` before each Kafka scenario starts, so "
             "each scenario consumes a backlog (catch-up throughput, not a steady-state rate).")
    L.append("- Rebuilds: records-log entries replayed / seconds, as contextd prints them (from opening the state to its "
             "final flush). `contextd rebuild` rebuilds the data dir of (a); `contextd rebuild --brokers` that of (e), "
             "from `context.records` on (e)'s broker right after (e) stops, its end known by half a second with nothing "
             "more after the high watermarks, then snapshot versions settled against `context.snapshots`.\n")
    L.append("## Raw results\n")
    L.append("```json")
    for r in rows + load_rows + ([latency] if latency else []) + rebuilds:
        r = {k: v for k, v in r.items() if k != "metrics"}
        L.append(json.dumps(r, default=str))
    L.append("```")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


# ------------------------------------------------------------ main


def main():
    ap = argparse.ArgumentParser(description="contextd end-to-end benchmarks (see bench/README.md)")
    ap.add_argument("--records", type=int, default=None, help="input records (default 1,000,000; --quick 50,000)")
    ap.add_argument("--users", type=int, default=None, help="users (default records / 10)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--quick", action="store_true", help="a short development run: 50k records, 10 s latency window")
    ap.add_argument("--only", default="a,b,c,d,e,f", help="scenarios to run, comma-separated letters (README)")
    ap.add_argument("--repeat", type=int, default=1, help="repetitions of each throughput scenario (medians reported)")
    ap.add_argument("--partitions", type=int, default=8, help="partitions of every topic and of contextd's state")
    ap.add_argument("--snapshot-format", default="json", choices=["json", "protobuf"], help="contextd's snapshot encoding")
    ap.add_argument("--chunk", type=int, default=5000, help="lines per HTTP ingest request (embedded)")
    ap.add_argument("--latency-seconds", type=float, default=None, help="probe window (default 30; --quick 10)")
    ap.add_argument("--probe-interval", type=float, default=0.05, help="seconds between latency probes")
    ap.add_argument("--latency-load", type=float, default=None, help="offered records/s for (b) (default half of (a))")
    ap.add_argument("--idle-exit", type=float, default=5.0, help="idle seconds after which the peers stop")
    ap.add_argument("--timeout", type=float, default=3600.0, help="limit for one scenario, seconds")
    ap.add_argument("--quix-no-changelog", action="store_true", help="run the Quix peer without changelog topics")
    ap.add_argument("--contextd", default=os.path.join(CACHE, "target/release/contextd"))
    ap.add_argument("--passthrough", default=os.path.join(CACHE, "target/release/passthrough"))
    ap.add_argument("--tansu", default=os.path.join(CACHE, "tansu/bin/tansu"))
    ap.add_argument("--work", default=None, help="working directory (default: a temp dir, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (data dirs, logs)")
    ap.add_argument("--out", default=os.path.join(HERE, "results.md"))
    args = ap.parse_args()
    if args.records is None:
        args.records = 50_000 if args.quick else 1_000_000
    if args.users is None:
        args.users = max(1, args.records // 10)
    if args.latency_seconds is None:
        args.latency_seconds = 10.0 if args.quick else 30.0
    only = set(args.only.replace(" ", "").split(","))
    started = time.time()
    if not os.path.exists(args.contextd):
        sys.exit(f"run.py: no contextd binary at {args.contextd}; build it first (cargo build --release)")
    work = args.work or tempfile.mkdtemp(prefix="contextd-bench-")
    os.makedirs(work, exist_ok=True)
    logdir = os.path.join(work, "logs")
    os.makedirs(logdir, exist_ok=True)
    log(f"working directory {work}")
    mach = machine()

    wdir = os.path.join(work, "workload")
    r = generate_workload(args, wdir, args.records, args.seed)
    if r.returncode != 0:
        sys.exit(f"run.py: contextd workload failed: {r.stderr.decode()[-500:]}")
    wl = {"dir": wdir, "tsv": os.path.join(wdir, "all.tsv"), "settings": os.path.join(wdir, "settings.json"),
          "records": args.records, "users": args.users,
          "bytes": sum(os.path.getsize(os.path.join(wdir, f"{t}.ndjson")) for t in INPUT_TOPICS)}
    log(f"workload: {args.records} records, {args.users} users, {wl['bytes'] / 1e6:.1f} MB")

    rows, load_rows, rebuilds, latency = [], [], [], None
    have_pt = os.path.exists(args.passthrough)
    have_tansu = os.path.exists(args.tansu)
    embedded = None
    try:
        if "a" in only:
            reps = []
            for rep in range(args.repeat):
                log(f"(a) contextd embedded, run {rep + 1}/{args.repeat}")
                reps.append(scenario_embedded(args, wl, work, logdir, rep))
                log(f"    {reps[-1].get('records_per_s') or 0:,.0f} records/s {reps[-1].get('error') or ''}")
            embedded = median_row(reps)
            rows.append(embedded)
            if "f" in only and not reps[-1].get("error"):
                log("(f) rebuild")
                rebuilds = scenario_rebuild(args, reps[-1]["data_dir"], logdir)
                for rb in rebuilds:
                    log(f"    {rb['scenario']}: {rb.get('records_per_s') or 0:,.0f} records/s {rb.get('error') or ''}")
        if "b" in only:
            offered = args.latency_load or (embedded["records_per_s"] / 2 if embedded and embedded.get("records_per_s") else 5000)
            log(f"(b) latency at {offered:,.0f} records/s offered")
            latency = scenario_latency(args, wl, work, logdir, offered)
            log(f"    p50 {latency.get('p50_ms') or 0:.1f} ms, p99 {latency.get('p99_ms') or 0:.1f} ms {latency.get('error') or ''}")
            if latency.get("record_p99_ms") is not None:
                log(f"    every record ({latency['records_measured']:,}): p50 {latency['record_p50_ms']:.0f} ms, "
                    f"p99 {latency['record_p99_ms']:.0f} ms")
        # The embedded scenarios leave gigabytes of files not yet written
        # back (the latency run's data dir held 1.3 GB of dirty pages when
        # (c) and (e) began): the kernel's writeback then competed with
        # whichever scenario came next (Kafka mode ran at 70-80k records/s
        # after (b), 105-119k without it; BENCHMARKS.md item 76). Their
        # data dirs are not read again, so they go, and what is left is
        # written before the next scenario starts.
        settle_machine(work, args.keep or bool(args.work))
        snap_avg = 4000
        if embedded and embedded.get("snapshots"):
            snap_avg = embedded["snapshot_bytes"] / embedded["snapshots"]
        kafka = [x for x in "cde" if x in only]
        if kafka and not have_tansu:
            rows.append({"scenario": "Kafka scenarios (c, d, e)", "error": f"no tansu binary at {args.tansu}"})
            kafka = []
        if kafka and not have_pt:
            rows.append({"scenario": "Kafka scenarios (c, d, e)", "error": f"no passthrough binary at {args.passthrough} (it loads the inputs)"})
            kafka = []

        def repeated(label, scenario):
            """Runs a Kafka scenario args.repeat times (stops if unavailable); the median row.
            A rebuild a repetition ran after it (`rebuild`: (e)'s) goes in as the median of
            all of them, not equal to the live run's digest if any one was not."""
            reps, nested = [], []
            for rep in range(args.repeat):
                log(f"{label}, run {rep + 1}/{args.repeat}")
                rs, load = scenario(args, wl, logdir, work, rep)
                nested += [r.pop("rebuild") for r in rs if "rebuild" in r]
                reps += rs
                if load:
                    load_rows.append(load)
                log(f"    {rs[-1].get('records_per_s') or 0:,.0f} records/s {rs[-1].get('error') or ''}")
                if rs[-1].get("unavailable"):
                    break
            row = median_row(reps)
            if nested:
                rb = median_row(nested)
                if any(x.get("digest_match") is False for x in nested):
                    rb["digest_match"] = False
                    rb["note"] = "digest after rebuild differs from the live run's (in one repetition at least)"
                row["rebuild"] = rb
            return row

        if "d" in kafka:
            quix = repeated("(d) Quix peer", scenario_quix)
            rows.append(quix)
            if not (embedded and embedded.get("snapshots")) and quix.get("snapshots"):
                snap_avg = quix["snapshot_bytes"] / quix["snapshots"]
        if "c" in kafka:
            co, pt = [], []
            for rep in range(args.repeat):
                log(f"(c) consume-only and pass-through ({snap_avg:,.0f} B snapshots), run {rep + 1}/{args.repeat}")
                rs, load = scenario_baselines(args, wl, logdir, snap_avg)
                if load:
                    load_rows.append(load)
                for x in rs:
                    (co if x["scenario"].startswith("consume-only") else pt).append(x)
                    log(f"    {x['scenario']}: {x.get('records_per_s') or 0:,.0f} records/s {x.get('error') or ''}")
            rows += [median_row(x) for x in (co, pt) if x]
        if "e" in kafka:
            rows.append(repeated("(e) contextd Kafka mode", scenario_contextd_kafka))
            kr = rows[-1].pop("rebuild", None)
            if kr:
                rebuilds.append(kr)
                log(f"    {kr['scenario']}: {kr.get('records_per_s') or 0:,.0f} records/s {kr.get('error') or ''}")
        if load_rows:
            load_rows = [median_row(load_rows)]
    finally:
        report(args, mach, wl, rows, latency, rebuilds, load_rows, started, args.out)
        log(f"wrote {args.out}")
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")


if __name__ == "__main__":
    main()
