bash benchmarks/install_on_device.sh /tmp/site >/dev/null 2>&1
(cd .whl/old && bash benchmarks/install_on_device.sh /tmp/site_old >/dev/null 2>&1)
export FLASHINFER_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
cd benchmarks
for t in site_old site; do
  PYTHONPATH=/tmp/$t:/tmp/site timeout 170 python3 bench_decode.py --shapes 32/8/128 9/3/64 14/2/64 --batches 12 24 37 64 --kv-lens 8192 32768 --iters 30 --out-dir $OUT/splits_$t > $OUT/splits_$t.txt 2>&1
  echo "== $t"; grep -E "^\| (32|14|9)/" $OUT/splits_$t.txt | awk -F'|' '{print $2,$3,$4,$10,$11}' | tr '\n' ';'; echo
done
