"""Helpers of the SGLang tests: import SGLang on a CPU-only machine, build its backends and batches.

SGLang's attention registry imports model configs that import torchvision at module level.
torchvision is not installable next to CPU torch (pip pulls a CUDA torch with it), and none
of the code under test uses it, so :func:`import_sglang` puts a stand-in on ``sys.meta_path``
for this process only (nothing is installed, a real torchvision wins), after pinning
transformers' "is torchvision available" answer to the truth (no), so transformers keeps
its torchvision-free code paths.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

import pytest


class _Anything:
    """What any attribute of the stand-in is: constructible, callable, with any attribute."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return _Anything()


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def install_torchvision_stub() -> None:
    """Make ``import torchvision...`` succeed in this process if torchvision is missing."""
    if importlib.util.find_spec("torchvision") is not None:
        return
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()  # cached now, while the answer is still "no"
    sys.meta_path.append(_TorchvisionStub())


def import_sglang():
    """Import SGLang's attention registry (skip the test if sglang is not installed)."""
    pytest.importorskip("sglang")
    install_torchvision_stub()
    from sglang.srt.layers.attention import attention_registry

    return attention_registry


def child_resolve_options(queue) -> None:
    """Target of a spawned process: what a scheduler process sees (the plugin, the options)."""
    install_torchvision_stub()
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins import load_plugins

    from art_runtime.integrations.sglang.options import resolve_options

    load_plugins()
    queue.put(("art" in ATTENTION_BACKENDS, resolve_options()))
