bash benchmarks/install_on_device.sh /tmp/site >/dev/null 2>&1
(cd .whl/old && bash benchmarks/install_on_device.sh /tmp/site_old >/dev/null 2>&1)
export FLASHINFER_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
cd benchmarks
for t in site_old site; do echo "== real $t"
PYTHONPATH=/tmp/$t:/tmp/site timeout 200 python3 bench_real_attention.py --captures ../.whl/caps --settings default --iters 20 --out-dir $OUT/real_$t > $OUT/real_$t.txt 2>&1
grep -E "^\| (qwen|smol)" $OUT/real_$t.txt | awk -F'|' '{print $2,$3,$5,$6,$7,$9,$10,$12}' | head -24
done
