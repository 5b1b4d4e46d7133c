"""bench_decode.py with mode off reading one KV head a program (shared_heads_per_item -> 1)."""
import sys
sys.path.insert(0, sys.argv.pop(1))  # the benchmarks folder
import art_runtime.decode as decode
decode.shared_heads_per_item = lambda num_kv_heads, group_size, head_dim: 1
import bench_decode
sys.exit(bench_decode.main(sys.argv[1:]))
