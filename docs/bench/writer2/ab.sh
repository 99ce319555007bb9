#!/bin/bash
# Interleaved A/B of the assign shape: start binary (da40150), main's start (b40318f), this branch.
cd /work/wt-writer
L=/tmp/w2cg/loadtest
OUT=docs/bench/writer2
for r in $(seq $1 $2); do
  for v in start before after; do
    case $v in start) H=/work/bench-start/presence-hub;; before) H=/tmp/writer2-before;; after) H=/tmp/writer2-after;; esac
    echo "$(date -u +%H:%M:%S) round $r $v $(uptime)" >> $OUT/runs.log
    $L assign --hub-bin $H --chats 20000 --operators 1000 --departments 100 --max-chats 20 --json $OUT/assign-$v-$r.json > /tmp/w2cg/run-$v-$r.log 2>&1
    echo "  rc=$? $(grep -c FAIL /tmp/w2cg/run-$v-$r.log) FAIL; $(grep -m1 'decision_rate' /tmp/w2cg/run-$v-$r.log)" >> $OUT/runs.log
  done
done
