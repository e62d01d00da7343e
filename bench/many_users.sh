#!/bin/bash
# Peak memory of embedded contextd holding about a million users.
#
#   bash bench/many_users.sh [RECORDS] [USERS]        (defaults: 2500000 1000000)
#
# Generates a workload with uniformly chosen users (`--zipf 0`, so most users
# appear), starts `contextd run` on a fresh data dir under /tmp, posts every
# input file with `contextd produce`, waits until every record is applied or
# dead-lettered, then prints the time taken, the users gauge and the
# process's peak RSS (VmHWM). Settings come from the environment as usual,
# e.g. CONTEXTD_STORAGE__USER_CACHE_MB=32 CONTEXTD_PIPELINE__BATCH_RECORDS=1024.
set -euo pipefail
RECORDS=${1:-2500000}
USERS=${2:-1000000}
B=${CONTEXTD:-/root/.cache/contextd/target/release/contextd}
W=/tmp/contextd-many-users-workload-$RECORDS-$USERS
D=$(mktemp -d /tmp/contextd-many-users-XXXXXX)
ADDR=127.0.0.1:${PORT:-18090}
[ -f "$W/all.tsv" ] || "$B" workload --out "$W" --records "$RECORDS" --users "$USERS" --zipf 0 > /dev/null
"$B" run --data-dir "$D" --http-addr "$ADDR" --partitions 8 > "$D.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; rm -rf "$D" "$D.log"' EXIT
for _ in $(seq 100); do curl -sf "http://$ADDR/healthz" > /dev/null && break; sleep 0.1; done
curl -sf -X PUT --data-binary @"$W/settings.json" -H 'content-type: application/json' \
  "http://$ADDR/api/admin/visibility" > /dev/null
T0=$(date +%s)
for t in zendesk.events sunshine.events sunshine.profiles; do
  "$B" produce --topic "$t" --http-addr "$ADDR" "$W/$t.ndjson" > /dev/null
done
while true; do
  M=$(curl -s "http://$ADDR/metrics")
  done_=$(echo "$M" | awk '/^contextd_records_applied_total/ {s+=$2} /^contextd_records_dead_lettered_total/ {s+=$2} END {printf "%d", s}')
  [ "$done_" -ge "$RECORDS" ] && break
  sleep 2
done
T1=$(date +%s)
echo "$RECORDS records, $USERS users (uniform): processed in $((T1 - T0)) s"
echo "$M" | grep '^contextd_users ' || echo 'contextd_users: not reported yet (updated every 10 s)'
echo "$M" | grep '^contextd_user_cache_bytes ' || true
grep -E "VmHWM|VmRSS" /proc/$PID/status
