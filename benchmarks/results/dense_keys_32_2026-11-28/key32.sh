# The tree with 32-bit dense keys against .whl/old (the previous commit) in one call: GPU tests, the selection kernel
# per layer (profile_mode.py), bench_real_attention and bench_decode_step. Run from the repository root on the device.
bash benchmarks/install_on_device.sh /tmp/site >/dev/null 2>&1
(cd .whl/old && bash benchmarks/install_on_device.sh /tmp/site_old >/dev/null 2>&1)
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
R=$PWD
(cd /tmp && PYTHONPATH=/tmp/site timeout 150 python3 -m pytest -q -p no:cacheprovider $R/tests/test_policies.py -k "selection or dense or quest_scoring" 2>&1 | tail -2)
cd benchmarks
for L in qwen2.5-0.5b:12 smollm2-135m:25; do for t in site_old site; do echo "== $t $L"
PYTHONPATH=/tmp/$t:/tmp/site python3 results/deep_rows_2026-11-28/profile_mode.py ../.whl/caps $L mass:eps=0.05 mass 2>&1 | grep -E "select" ; done; done
for t in site_old site; do echo "== real $t"
PYTHONPATH=/tmp/$t:/tmp/site timeout 150 python3 bench_real_attention.py --captures ../.whl/caps --layers qwen2.5-0.5b:12 qwen2.5-0.5b:20 smollm2-135m:25 smollm2-135m:15 --settings default --iters 20 --out-dir $OUT/real_$t 2>&1 | grep -E "^\| (qwen|smol)" | grep -v "FlashInfer\| off " | awk -F'|' '{print $2,$3,$5,$7,$8,$10,$11,$16,$17}'
done
for t in site_old site; do echo "== step $t"
PYTHONPATH=/tmp/$t:/tmp/site timeout 200 python3 bench_decode_step.py --captures ../.whl/caps --iters 20 --out-dir $OUT/step_$t 2>&1 | grep -E "^\| (llama|qwen)" | head -6 | awk -F'|' '{print $2,$3,$4,$10,$11,$13}'
done
