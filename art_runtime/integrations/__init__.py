"""Integrations of ART decode into model runtimes (transformers, SGLang)."""
