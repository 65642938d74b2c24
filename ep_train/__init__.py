"""ep-train: Mixtral-style MoE training with expert parallelism under DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
