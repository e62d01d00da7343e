#!/usr/bin/env bash
# Installs what building and testing contextd needs, if missing (Debian/Ubuntu).
set -euo pipefail
need=()
[ -e /usr/lib/llvm-14/lib/libclang.so ] || ls /usr/lib/llvm-*/lib/libclang*.so >/dev/null 2>&1 || need+=(libclang-dev)
command -v kcat >/dev/null || need+=(kcat)
command -v cmake >/dev/null || need+=(cmake)
dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
