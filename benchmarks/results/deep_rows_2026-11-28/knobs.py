"""Run a benchmark with decode knobs from the environment: PASS (PASS_BLOCKS), PULL (MASS_PULL_CHECKS),
MASS_WARPS (warps of mode mass's decode kernel)."""
import os, runpy, sys
import art_runtime.decode as D
if os.environ.get("PASS"):
    D.PASS_BLOCKS = int(os.environ["PASS"])
if os.environ.get("PULL"):
    D.MASS_PULL_CHECKS = int(os.environ["PULL"])
if os.environ.get("MASS_WARPS"):
    base = D.BatchARTDecodeWrapper._num_warps
    def patched(plan, device):
        return int(os.environ["MASS_WARPS"]) if plan.termination.mode == "mass" else base(plan, device)
    D.BatchARTDecodeWrapper._num_warps = staticmethod(patched)
script = sys.argv[1]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
