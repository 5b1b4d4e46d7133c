bash benchmarks/install_on_device.sh /tmp/site >/dev/null 2>&1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
cd benchmarks
for P in 2 4 8 16; do
  echo "== real mass pps $P"
  MASS_PPS=$P PYTHONPATH=/tmp/site timeout 150 python3 results/deep_rows_2026-11-28/pps.py bench_real_attention.py --captures ../.whl/caps --layers qwen2.5-0.5b:12 qwen2.5-0.5b:20 smollm2-135m:25 smollm2-135m:15 --settings default --iters 20 --out-dir $OUT/real_$P 2>&1 | grep -E "^\| (qwen|smol)" | grep -v "FlashInfer" | awk -F'|' '{print $2,$3,$4,$5,$6,$7,$8,$9,$11,$16,$17}'
done
for P in 2 8; do
  echo "== step pps $P"
  MASS_PPS=$P PYTHONPATH=/tmp/site timeout 150 python3 results/deep_rows_2026-11-28/pps.py bench_decode_step.py --captures ../.whl/caps --models qwen2.5-0.5b --no-flashinfer --iters 20 --out-dir $OUT/step_$P 2>&1 | tail -25
done
