#!/usr/bin/env bash
# Runs the console browser test: installs Debian chromium if missing (no
# browser download by playwright), installs playwright-core from the lock
# file if missing, then runs tests/browser/console.test.mjs.
#   CONTEXTD_BIN=/path/to/contextd tests/browser/run.sh
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x /usr/bin/chromium ]; then
  echo "run.sh: installing chromium (apt-get)" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q chromium chromium-driver
fi

if [ ! -d node_modules/playwright-core ]; then
  echo "run.sh: npm ci" >&2
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund
fi

exec node console.test.mjs "$@"
