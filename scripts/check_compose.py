#!/usr/bin/env python3
"""Validates docker-compose.yml without a Docker engine: against the Compose
specification (PyPI `compose-spec`, models generated from the official
schema, YAML anchors and merge keys resolved) and against contextd itself
(every CONTEXTD_* variable names a real configuration key, dependencies and
volumes exist, host ports are unique)."""
import os
import re
import sys

import yaml
from compose_spec import ComposeSpecification, Service

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOWN_KEYS = {  # top-level keys of contextd's configuration (src/config.rs)
    "DATA_DIR", "HTTP_ADDR", "BROKERS", "GROUP_ID", "PARTITIONS", "REPLICATION_FACTOR",
    "SNAPSHOT_FORMAT", "LOG_FORMAT", "MAX_RECORD_BYTES", "TOPICS", "SNAPSHOT", "TIMELINE",
    "PIPELINE", "STORAGE", "KAFKA", "CONFIG",
}


def main():
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        doc = yaml.safe_load(f)
    ComposeSpecification.model_validate(doc)
    errors = []
    services = doc.get("services", {})
    ports = []
    service_keys = {f.alias or n for n, f in Service.model_fields.items()} | set(Service.model_fields)
    for name, svc in services.items():
        for key in svc:
            if key not in service_keys and not key.startswith("x-"):
                errors.append(f"{name}: unknown service key {key}")
        for dep in (svc.get("depends_on") or {}):
            if dep not in services:
                errors.append(f"{name}: depends_on unknown service {dep}")
        for vol in svc.get("volumes") or []:
            src = vol.split(":")[0]
            if not src.startswith((".", "/")) and src not in (doc.get("volumes") or {}):
                errors.append(f"{name}: volume {src} is not declared")
        for p in svc.get("ports") or []:
            ports.append(str(p).split(":")[0])
        env = svc.get("environment") or {}
        for key in env:
            m = re.match(r"CONTEXTD_([A-Z_]+?)(__|$)", key)
            if key.startswith("CONTEXTD_") and (not m or m.group(1) not in KNOWN_KEYS):
                errors.append(f"{name}: {key} is not a contextd setting")
        if "build" in svc:
            dockerfile = os.path.join(ROOT, svc["build"].get("context", "."), svc["build"].get("dockerfile", "Dockerfile"))
            if not os.path.exists(dockerfile):
                errors.append(f"{name}: {dockerfile} does not exist")
    if len(ports) != len(set(ports)):
        errors.append(f"host ports used twice: {ports}")
    if errors:
        print("docker-compose.yml: " + "; ".join(errors), file=sys.stderr)
        return 1
    print(f"docker-compose.yml: valid ({len(services)} services)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
