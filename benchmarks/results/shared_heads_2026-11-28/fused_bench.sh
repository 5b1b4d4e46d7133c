bash benchmarks/install_on_device.sh /tmp/site >/dev/null 2>&1
(cd .whl/old && bash benchmarks/install_on_device.sh /tmp/site_old >/dev/null 2>&1)
export FLASHINFER_CUDA_ARCH_LIST=9.0a PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
R=$PWD
(cd /tmp && PYTHONPATH=/tmp/site python3 $R/.whl/probe/fused_check.py 2>&1 | tail -4)
cd benchmarks
run() { # name site overrides args...
  name=$1; site=$2; over=$3; shift 3
  PYTHONPATH=/tmp/$site:/tmp/site timeout 170 python3 -c "
import sys, runpy, art_runtime.decode as d
$over
sys.argv = ['bench_decode.py', '--shapes', '32/8/128', '14/2/64', '--batches', '1', '16', '64', '128', '--kv-lens', '4096', '32768', '--iters', '50', '--out-dir', '$OUT/$name'] + sys.argv[1:]
runpy.run_path('bench_decode.py', run_name='__main__')" "$@" > $OUT/$name.txt 2>&1
  echo "== $name"; grep -E "^\| (32|14)" $OUT/$name.txt | awk -F'|' '{print $2,$3,$4,$6,$9,$10,$11,$12,$15,$17}'
}
run old site_old "" 
run new site ""
run new_w8 site "" --launch 8/0
run new_tile8k site "d.OFF_TILE_ELEMENTS = 8192"
