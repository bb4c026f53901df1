#!/bin/sh
# Install Haraka (the npm package) where bench/e2e.py looks for it:
#   sh bench/setup_haraka.sh [DIR]     (default: /var/tmp/fastrelay-bench/haraka)
# Needs node and npm (Node 20 is on the project machines). Haraka's optional
# native modules may fail to build; the benchmark does not need them.
set -eu
dir=${1:-${FASTRELAY_BENCH_WORK:-/var/tmp/fastrelay-bench}/haraka}
mkdir -p "$dir"
cd "$dir"
[ -f package.json ] || npm init -y >/dev/null
npm install --no-audit --no-fund Haraka@3.3.4
echo "Haraka installed in $dir"
