# The dealt tree (this repository from commit eaab0b7 on) against .whl/old (contiguous chunks), batch 4 and 16.
bash benchmarks/install_on_device.sh /tmp/site >/dev/null 2>&1
(cd .whl/old && bash benchmarks/install_on_device.sh /tmp/site_old >/dev/null 2>&1)
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
cd benchmarks
for B in 4 16; do for t in site_old site; do
  echo "== batch $B $t"
  PYTHONPATH=/tmp/$t:/tmp/site timeout 120 python3 bench_real_attention.py --captures ../.whl/caps --layers qwen2.5-0.5b:12 smollm2-135m:25 --batch $B --settings default --iters 20 --out-dir $OUT/b${B}_$t 2>&1 | grep -E "^\| (qwen|smol)" | grep -v "FlashInfer\| off " | awk -F'|' '{print $2,$3,$5,$6,$7,$8,$9,$11,$16,$17}'
done; done
