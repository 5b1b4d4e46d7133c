"""bench_decode.py with mode off reading two KV heads a program wherever they fit the tile
(plan.SHARED_HEADS_MIN_FILL -> 0, the rule before NOTES v54)."""
import sys
sys.path.insert(0, sys.argv.pop(1))  # the benchmarks folder
import art_runtime.plan as plan
plan.SHARED_HEADS_MIN_FILL = 0
import bench_decode
sys.exit(bench_decode.main(sys.argv[1:]))
