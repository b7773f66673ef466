#!/usr/bin/env bash
# Benchmark pyrelay beside Postfix in one run (ratios, not absolute numbers, are meaningful on a
# shared machine).  Uses ../../shared/bench/relay_bench.sh (smtp-source -> relay -> smtp-sink).
#
#   bench/run.sh            quick: 10 clients x 5 KB and 10 clients x 100 KB, 5 repeats (REPEATS=N)
#   bench/run.sh -M         the harness's full matrix (1/10/50 clients x 5 KB, 10 x 100 KB)
#   bench/run.sh -n 500 ... any relay_bench.sh option
#   BENCH_DKIM=1 bench/run.sh   adds pyrelay-1w-dkim: the same, signing every message (RSA-2048
#                               key for example.org, smtp-source's sender domain)
#
# Needs Debian's postfix package (smtp-source, smtp-sink, postfix):
#   DEBIAN_FRONTEND=noninteractive apt-get install -y postfix
# Prints the harness's lines, then a summary: median e2e msgs/s and PSS per relay and config,
# and each pyrelay variant's ratio to Postfix.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
harness=${RELAY_BENCH:-$here/../../shared/bench/relay_bench.sh}
[ -x "$harness" ] || harness="bash $harness"
export SINK_PORT=${SINK_PORT:-20061} RELAY_PORT=${RELAY_PORT:-20062}
common='RELAYHOST=127.0.0.1:$SINK_PORT RELAYHOST_TLS_LEVEL=none ALLOW_EMPTY_SENDER_DOMAINS=1 PYRELAY_LISTEN=127.0.0.1:$RELAY_PORT PYRELAY_SPOOL_DIR=$RELAY_SPOOL'
relays=(postfix
  "pyrelay-1w=$common PYRELAY_WORKERS=1 python -m pyrelay"
  "pyrelay-2w=$common PYRELAY_WORKERS=2 python -m pyrelay")
if [ -n "${BENCH_DKIM:-}" ]; then
  dkim_dir=$(mktemp -d)
  python -c "import sys; from pathlib import Path; from pyrelay.dkim import generate_keys; generate_keys(Path(sys.argv[1]), ['example.org'])" "$dkim_dir"
  relays+=("pyrelay-1w-dkim=$common PYRELAY_DKIM_KEY_DIR=$dkim_dir PYRELAY_WORKERS=1 python -m pyrelay")
fi
out=$(mktemp)
if [ $# -eq 0 ]; then
  for cfg in "-n 2000 -c 10 -s 5000" "-n 500 -c 10 -s 100000"; do
    # shellcheck disable=SC2086
    $harness -r "${REPEATS:-5}" $cfg "${relays[@]}" | tee -a "$out"
  done
else
  $harness "$@" "${relays[@]}" | tee -a "$out"
fi
python3 "$here/summarize.py" < "$out"
rm -f "$out"
