bash benchmarks/install_on_device.sh /tmp/site >/dev/null 2>&1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
cd benchmarks
run() { echo "== $1 $2 $3"; PASS=$1 PULL=$2 PYTHONPATH=/tmp/site timeout 150 python3 results/deep_rows_2026-11-28/knobs.py bench_real_attention.py --captures ../.whl/caps --layers qwen2.5-0.5b:12 qwen2.5-0.5b:20 smollm2-135m:25 smollm2-135m:15 --settings $3 --iters 20 --out-dir $OUT/$1_$2_$4 2>&1 | grep -E "^\| (qwen|smol)" | grep -v "FlashInfer\| off " | awk -F'|' '{print $2,$3,$5,$7,$10,$11,$13,$16,$17}'; }
run 8 4 mass:eps=0.05 b8
run 4 4 mass:eps=0.05 b8
run 4 2 mass:eps=0.05,block_pages=16 b16
run 2 2 mass:eps=0.05,block_pages=16 b16
run 4 4 mass:eps=0.05,block_pages=16 b16
