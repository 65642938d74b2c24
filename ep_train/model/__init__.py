from ep_train.model.moe import MoELayer, RouterStats, inference_routing
from ep_train.model.router import Router, Routing
from ep_train.model.transformer import KVCache, ModelOutput, Transformer, build_model

__all__ = ["KVCache", "MoELayer", "ModelOutput", "Router", "RouterStats", "Routing", "Transformer", "build_model",
           "inference_routing"]
