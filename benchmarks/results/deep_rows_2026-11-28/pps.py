"""Run a benchmark with mode mass (only) planned at MASS_PPS work items per SM."""
import os, runpy, sys, torch
import art_runtime.decode as D
pps = int(os.environ.get("MASS_PPS", "0"))
if pps:
    orig = D.BatchARTDecodeWrapper._parallel_programs if hasattr(D, "BatchARTDecodeWrapper") else None
    cls = [c for c in vars(D).values() if isinstance(c, type) and "_parallel_programs" in vars(c)][0]
    base = cls._parallel_programs
    def patched(device, termination):
        if device.type == "cuda" and termination.mode == "mass":
            return pps * torch.cuda.get_device_properties(device).multi_processor_count
        return base(device, termination)
    cls._parallel_programs = staticmethod(patched)
script = sys.argv[1]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
