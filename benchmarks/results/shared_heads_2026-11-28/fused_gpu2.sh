bash benchmarks/install_on_device.sh /tmp/site >/dev/null 2>&1
(cd .whl/old && bash benchmarks/install_on_device.sh /tmp/site_old >/dev/null 2>&1)
export FLASHINFER_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
R=$PWD
cd benchmarks
for t in site site_old site site_old; do
  PYTHONPATH=/tmp/$t:/tmp/site timeout 100 python3 bench_decode.py --batches 1 4 --iters 100 --out-dir $OUT/small_$t > $OUT/small_$t.txt 2>&1
  echo "== small $t"; grep -E "^\| (32|14)" $OUT/small_$t.txt | awk -F'|' '{print $2,$3,$4,$10,$11,$15}' | tr '\n' ';'; echo
done
cd /tmp && PYTHONPATH=/tmp/site timeout 330 python3 -m pytest -q -p no:cacheprovider -x $R/tests/test_decode.py $R/tests/test_gpu.py $R/tests/test_sglang_graph_gpu.py $R/tests/test_sglang_backend.py 2>&1 | tail -4
