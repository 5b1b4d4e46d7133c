# The dealing extended to other modes (measured only). .whl/v1 holds this tree with one line of
# plan.build_plan changed so that the modes dealt come from ART_DEAL_MODES (default "mass"):
#   if termination.mode in os.environ.get("ART_DEAL_MODES", "mass").split(",") and ...
bash benchmarks/install_on_device.sh /tmp/site >/dev/null 2>&1
(cd .whl/v1 && bash benchmarks/install_on_device.sh /tmp/site_v1 >/dev/null 2>&1)
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
cd benchmarks
for m in mass mass,bound,stability; do
  echo "== deal $m"
  ART_DEAL_MODES=$m PYTHONPATH=/tmp/site_v1:/tmp/site timeout 200 python3 bench_real_attention.py --captures ../.whl/caps --layers qwen2.5-0.5b:12 qwen2.5-0.5b:20 --settings bound:eps=0.05,relative_to=values stability --iters 20 --out-dir $OUT/$m 2>&1 | grep -E "^\| (qwen|smol)" | grep -v "FlashInfer\| off " | awk -F'|' '{print $2,$3,$5,$6,$7,$8,$9,$11,$16,$17}'
done
