"""ep-train: Mixtral-style MoE training with expert parallelism under DeepSpeed ZeRO-3."""

import os
import sys

__version__ = "0.1.0"


def _default_torch_extensions_dir() -> None:
    """Keep DeepSpeed's JIT-built ops (CPU Adam, shm_comm) per Python environment.

    torch builds and loads them under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``,
    one folder for every environment of the user: a second virtualenv (another torch or DeepSpeed)
    rebuilds over the first one's build, and trainers starting meanwhile wait on the build lock
    (a 206 s stall was seen). Set here because every entry point (``ep-train``, ``python -m
    ep_train.train`` under torchrun or deepspeed, ``data_prep_tool``, the benchmarks) imports this
    package before DeepSpeed, and torch reads the variable only when an op is built or loaded. A value
    the user set wins; an environment whose prefix is not writable keeps torch's default.
    """
    if "TORCH_EXTENSIONS_DIR" in os.environ or not os.access(sys.prefix, os.W_OK):
        return
    # realpath: one build per real environment, however it is reached (a symlinked .venv too)
    os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(os.path.realpath(sys.prefix), "torch_extensions")


_default_torch_extensions_dir()

_API = {"load": "ep_train.api", "Loaded": "ep_train.api", "generate": "ep_train.api",
        "to_hf": "ep_train.interop.hf_export", "from_hf": "ep_train.interop.hf", "upcycle": "ep_train.interop.upcycle",
        "analyze_experts": "ep_train.analyze"}


def __getattr__(name: str) -> object:
    """``ep_train.load``, ``ep_train.Loaded`` and ``ep_train.generate`` import torch on first use only,
    so ``import ep_train`` (the CLIs' ``plan``/``check``, ``data_prep_tool``) stays light."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), "analyze" if name == "analyze_experts" else name)
    raise AttributeError(f"module 'ep_train' has no attribute {name!r}")
