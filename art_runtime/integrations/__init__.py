"""Integrations of ART into serving stacks: ``art_runtime.integrations.sglang`` (an SGLang
attention backend loaded as an SGLang plugin) and, separately, transformers."""
