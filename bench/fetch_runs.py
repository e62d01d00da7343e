#!/usr/bin/env python3
"""How a broker interleaves partitions in one consumer's stream: produces the
same number of records to every partition of a new topic, consumes them all
with one librdkafka consumer (confluent-kafka) and prints the runs, the
stretches of consecutive records from one partition.

    python3 bench/fetch_runs.py [--brokers HOST:PORT] [--partitions 8]
        [--records 80000] [--value-bytes 1200] [CONSUMER_PROP=VALUE ...]

Without --brokers it starts a tansu broker (in-memory storage) on a free
loopback port ($TANSU_BIN, else ~/.cache/contextd/tansu/bin/tansu). Kafka mode's
materializing stage splits each polled batch by partition over its workers,
so long runs leave all but one worker idle. BENCHMARKS.md (session 10)
quotes it.
"""

import argparse
import os
import socket
import subprocess
import time
import uuid

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tansu():
    binary = os.environ.get("TANSU_BIN", os.path.expanduser("~/.cache/contextd/tansu/bin/tansu"))
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                             "--storage-engine", "memory://tansu/"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit(f"tansu did not listen on port {port}")
            time.sleep(0.1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers")
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--records", type=int, default=80000)
    ap.add_argument("--value-bytes", type=int, default=1200)
    ap.add_argument("props", nargs="*", help="consumer properties, NAME=VALUE")
    args = ap.parse_args()
    extra = dict(p.split("=", 1) for p in args.props)
    proc = None
    brokers = args.brokers
    if not brokers:
        proc, brokers = start_tansu()
    try:
        topic = f"fetch-runs-{uuid.uuid4().hex[:8]}"
        admin = AdminClient({"bootstrap.servers": brokers})  # alive until the topic exists
        admin.create_topics([NewTopic(topic, args.partitions, 1)])[topic].result()
        producer = Producer({"bootstrap.servers": brokers, "linger.ms": 5})
        value = b"x" * args.value_bytes
        for i in range(args.records):
            producer.produce(topic, value, partition=i % args.partitions)
            if i % 10000 == 0:
                producer.poll(0)
        producer.flush()
        consumer = Consumer({"bootstrap.servers": brokers, "group.id": topic, "auto.offset.reset": "earliest",
                             "fetch.wait.max.ms": "10", **extra})
        consumer.subscribe([topic])
        seq = []
        deadline = time.time() + 120
        while len(seq) < args.records and time.time() < deadline:
            m = consumer.poll(1.0)
            if m is not None and not m.error():
                seq.append(m.partition())
        consumer.close()
        producer = admin = None  # closed before the broker stops
        runs = []
        for p in seq:
            if runs and runs[-1][0] == p:
                runs[-1][1] += 1
            else:
                runs.append([p, 1])
        lengths = sorted(n for _, n in runs)
        print(f"consumer properties: {extra or 'defaults (and fetch.wait.max.ms=10)'}")
        print(f"{len(seq):,} records from {args.partitions} partitions in {len(runs):,} runs: "
              f"median run {lengths[len(lengths) // 2]:,}, longest {lengths[-1]:,}, "
              f"shortest {lengths[0]:,} records")
        print("partition of every run, in order:", " ".join(str(p) for p, _ in runs[:60]) + (" ..." if len(runs) > 60 else ""))
    finally:
        if proc:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
