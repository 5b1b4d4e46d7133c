"""Integrations of ART decode into model runtimes: ``art_runtime.integrations.transformers``
(Hugging Face decoder models) and ``art_runtime.integrations.sglang`` (an SGLang attention
backend loaded as an SGLang plugin)."""
