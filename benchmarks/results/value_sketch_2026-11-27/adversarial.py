"""Adversarial cases (tests/test_termination.adversarial_case: huge logits, ties, late dominators,
value outliers, page sizes 1-16, groups 1-7) through the prototype's torch backend, values-relative,
with and without the value-sketch term (int4, cut 4 eps, f 0.1); assert_bound_holds checks the
guarantee on every run. Run from a scratch tree with value_sketch_prototype.diff applied:
    PYTHONPATH=. python3 /path/to/adversarial.py
"""
import random
import sys

sys.path.insert(0, "tests")
import art_runtime.reference as ref  # noqa: E402
from art_runtime import TerminationConfig  # noqa: E402
from test_termination import adversarial_case, assert_bound_holds, run  # noqa: E402

rng = random.Random(0)
total = {0: 0, 4: 0}
fewer = 0
cases = 0
for trial in range(150):
    kw = dict(seq_lens=[rng.randint(1, 300) for _ in range(rng.randint(1, 3))], group=rng.choice([1, 2, 4, 7]),
              page_size=rng.choice([1, 3, 8, 16]), logit_scale=rng.choice([0.1, 1.0, 10.0, 100.0]),
              tie=rng.random() < 0.5, late_dominator=rng.random() < 0.5, value_outlier=rng.random() < 0.5,
              seed=rng.randint(0, 2**16))
    eps = rng.choice([1e-3, 0.01, 0.05, 0.1, 0.3])
    case = adversarial_case(device="cpu", **kw)
    term = TerminationConfig(mode="bound", eps=eps, relative_to="values", min_pages=1, block_pages=1)
    pages = {}
    for bits in (0, 4):
        ref.VS_BITS, ref.SKETCH_CUT_SHARE, ref.VS_F = bits, (4.0 if bits else 1.0), 0.1
        out, stats = run(case, "torch", term)
        assert_bound_holds(case, out, term)
        pages[bits] = int(stats.visited_pages.sum())
        total[bits] += pages[bits]
    cases += 1
    fewer += pages[4] < pages[0]
print(f"{cases} adversarial cases, values-relative: guarantee held in every run; pages read {total[0]} without, "
      f"{total[4]} with the value sketch; fewer pages in {fewer} cases")
