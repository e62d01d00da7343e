#!/usr/bin/env bash
# Builds the tansu Kafka-protocol broker used by the broker tests, once, into a cache.
set -euo pipefail
root="${TANSU_ROOT:-$HOME/.cache/contextd/tansu}"
if [ -x "$root/bin/tansu" ]; then exit 0; fi
echo "building tansu 0.6.0 into $root (about 7 minutes, once)"
cargo install tansu --locked --version 0.6.0 --features dynostore --root "$root"
