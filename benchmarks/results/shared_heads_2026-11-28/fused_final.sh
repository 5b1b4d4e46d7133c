bash benchmarks/install_on_device.sh /tmp/site >/dev/null 2>&1
(cd .whl/old && bash benchmarks/install_on_device.sh /tmp/site_old >/dev/null 2>&1)
export FLASHINFER_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
R=$PWD
(cd /tmp && PYTHONPATH=/tmp/site timeout 200 python3 -m pytest -q -p no:cacheprovider $R/tests/test_decode.py $R/tests/test_gpu.py $R/tests/test_sglang_graph_gpu.py 2>&1 | tail -3)
(cd /tmp && PYTHONPATH=/tmp/site timeout 100 python3 $R/.whl/probe/fused_check.py 2>&1 | tail -1)
cd benchmarks
for t in site_old site; do
  PYTHONPATH=/tmp/$t:/tmp/site timeout 200 python3 bench_decode.py --iters 50 --out-dir $OUT/decode_$t > $OUT/decode_$t.txt 2>&1
  echo "== decode $t"; grep -E "^\| (32|14)" $OUT/decode_$t.txt | awk -F'|' '{print $2,$3,$4,$10,$11,$15}'
done
for t in site_old site; do echo "== step $t"
  PYTHONPATH=/tmp/$t:/tmp/site timeout 200 python3 bench_decode_step.py --captures ../.whl/caps --iters 20 --out-dir $OUT/step_$t > $OUT/step_$t.txt 2>&1
  grep -E "^\| (llama|qwen)" $OUT/step_$t.txt | head -6 | awk -F'|' '{print $2,$3,$4,$10,$11,$13}'
done
