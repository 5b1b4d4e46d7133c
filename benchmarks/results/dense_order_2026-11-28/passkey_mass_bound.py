"""Modes mass (eps 0.02 / 0.05 / 0.1) and bound (values, eps 0.05) on the 1.5K passkey of
tests/test_transformers.py, in Quest and mass order (passkey_stability.py's setup; each line
prints the (mode, eps) pair after the word "patience")."""
import os
os.environ["TRITON_INTERPRET"] = "0"
import torch
from art_runtime import TerminationConfig
from art_runtime.integrations.transformers import ARTPagedCache, enable_art, greedy_decode, load_model, model_forward
from art_runtime.policies import DensePolicy
from art_runtime.tasks import TaskBuilder, load_filler

torch.manual_seed(0)
model, tokenizer = load_model("smollm2", progress=False)
model = enable_art(model)
sample = TaskBuilder(tokenizer, load_filler("austen")).build("passkey", 1536, depth=0.4, seed=3)
ids = torch.tensor([sample.input_ids])
prefilled = ARTPagedCache(model, TerminationConfig(mode="off"))
with torch.no_grad():
    model_forward(model, ids[:, :-1], prefilled)
dense, _ = greedy_decode(model, ids[:, -1:], prefilled.dense_cache(), 6)
print("dense", repr(tokenizer.decode(dense[0])), sample.score(tokenizer.decode(dense[0])))
configs = [TerminationConfig(mode="mass", eps=e) for e in (0.02, 0.05, 0.1)] + [TerminationConfig(mode="bound", eps=0.05, relative_to="values")]
for order in ("quest", "mass"):
    for config in configs:
        patience = (config.mode, config.eps)
        cache = prefilled.clone(config, policy=DensePolicy(order=order))
        tokens, _ = greedy_decode(model, ids[:, -1:], cache, 6)
        text = tokenizer.decode(tokens[0])
        print(order, "patience", patience, repr(text), "score", sample.score(text),
              "same", torch.equal(tokens, dense), f"pages {cache.decode_record().fraction_of_context():.1%}")
