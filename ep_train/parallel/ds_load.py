"""ZeRO-3 checkpoint loading without gathering every expert (DeepSpeed 0.19.8).

``engine._load_checkpoint`` wraps ``load_module_state_dict`` in ``GatheredParameters`` over every AutoEP
expert parameter of the model (all layers, ``z3_params_to_fetch``), although AutoEP's ZeRO-3 checkpoints
keep experts out of the module state (``allowed_missing_keys``: their values come from the ZeRO shards, or
the NVMe swap files). With experts partitioned over several ranks (EP < world) that materialises every expert
of the model, in full, on every rank at once: the whole MoE, what sharded construction exists to avoid. With
parameters on NVMe it also needs a swap buffer per expert parameter of the model (``Not enough buffers 5 for
swapping 6``). ``fetch_only_loaded`` drops from that list the parameters the state dict does not load: the
gather was of values that are then written back unchanged.
"""

from __future__ import annotations

from typing import Any


def fetch_only_loaded(engine: Any) -> None:
    """Bind to ``engine`` a ``load_module_state_dict`` that gathers only parameters the state dict loads."""
    load = engine.load_module_state_dict
    names = {id(p): n for n, p in engine.module.named_parameters()}

    def load_module_state_dict(checkpoint: dict, strict: bool = True, custom_load_fn: Any = None,
                               fetch_z3_params: bool = False, z3_params_to_fetch: list | None = None,
                               allowed_missing_keys: Any = None) -> Any:
        if z3_params_to_fetch is not None and allowed_missing_keys is not None and custom_load_fn is None:
            module = checkpoint.get("module", {})
            z3_params_to_fetch = [p for p in z3_params_to_fetch
                                  if names.get(id(p)) not in allowed_missing_keys or names.get(id(p)) in module]
        return load(checkpoint=checkpoint, strict=strict, custom_load_fn=custom_load_fn,
                    fetch_z3_params=fetch_z3_params, z3_params_to_fetch=z3_params_to_fetch,
                    allowed_missing_keys=allowed_missing_keys)

    engine.load_module_state_dict = load_module_state_dict
