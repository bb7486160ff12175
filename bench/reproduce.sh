#!/usr/bin/env bash
# Every run behind docs/performance.md but its two long latency runs, in order (about 15 minutes on
# 2 cores).
#
#   bash bench/reproduce.sh OUTDIR
#
# Run from the checkout's root with trame_async, uvloop, websockets, psutil, matplotlib and py-spy
# installed (pip install -e ".[uvloop]" websockets psutil matplotlib py-spy). To measure another
# copy of the package (e.g. `git archive HEAD | tar -x -C /tmp/trame-head`), set
# PYTHONPATH=/tmp/trame-head: each JSON file records the path and a hash of the package it ran.
# py-spy needs ptrace rights on the processes it profiles (root, or kernel.yama.ptrace_scope=0).
set -euo pipefail
out=${1:?usage: bash bench/reproduce.sh OUTDIR}
mkdir -p "$out/pyspy/native"
py=${PYTHON:-python}

# Log CPU use by anything else on the machine while this script runs.
"$py" bench/monitor.py --exclude-tree $$ --out "$out/monitor.log" &
monitor=$!
trap 'kill "$monitor" 2>/dev/null || true' EXIT

run() {  # run NAME CMD...: stdout to NAME.txt, stderr (progress) to NAME.log
    local name=$1
    shift
    echo "$(date +%T) $name: $*" | tee -a "$out/commands.log"
    "$@" >"$out/$name.txt" 2>"$out/$name.log"
}

# Codec: ns per encode/decode against bare struct.
run codec "$py" bench/codec.py --repeat 7 --json "$out/codec.json"
# Fan-out, publisher as fast as flow control allows: S = 1, 10, 100 and 1000, 3 repeats each.
run fanout-flood "$py" bench/fanout.py -S 1 10 100 --repeat 3 --duration 3 \
    --json "$out/fanout-flood.json"
run fanout-flood-S1000 "$py" bench/fanout.py -S 1000 --repeat 3 --duration 3 \
    --json "$out/fanout-flood-S1000.json"
# Latency, paced at 100 frames/s for 5 s (500 frames per cell).
run fanout-paced "$py" bench/fanout.py -S 1 10 100 --rate 100 --duration 5 --repeat 3 \
    --json "$out/fanout-paced.json"
# What the robustness limits cost: default limits, default + token, every limit relaxed.
run fanout-limits "$py" bench/fanout.py -S 1 100 --repeat 3 --duration 4 \
    --relays trame-raw trame-raw-token trame-raw-relaxed trame trame-token trame-relaxed \
    --json "$out/fanout-limits.json"
# 10,000 idle clients, 1 s heartbeat; then 10 s of py-spy on the server.
run idle-10000 "$py" bench/idle.py -N 10000 --py-spy "$out/pyspy/idle-10000.txt" \
    --json "$out/idle-10000.json"
# Profiles (separate cells: py-spy costs CPU): server, and the load process of the `trame` cells.
run fanout-pyspy "$py" bench/fanout.py -S 1 100 --relays trame trame-raw --duration 5 \
    --py-spy "$out/pyspy" --py-spy-load --json "$out/fanout-pyspy.json"
run fanout-pyspy-native "$py" bench/fanout.py -S 100 --relays trame trame-raw --duration 5 \
    --py-spy "$out/pyspy/native" --py-spy-native --py-spy-load \
    --json "$out/fanout-pyspy-native.json"
for prof in "$out"/pyspy/*.txt "$out"/pyspy/native/*.txt; do
    "$py" bench/profile_top.py "$prof" --top 25 >"${prof%.txt}.top.md" || true
done
# Plots.
"$py" bench/plot.py "$out/fanout-flood.json" "$out/fanout-flood-S1000.json" \
    --out "$out/perf-fanout.png"
"$py" bench/plot.py "$out/fanout-paced.json" --latency --out "$out/perf-latency.png"
echo "$(date +%T) done" | tee -a "$out/commands.log"
