from ep_train.model.moe import MoELayer, RouterStats
from ep_train.model.router import Router, Routing
from ep_train.model.transformer import ModelOutput, Transformer, build_model

__all__ = ["MoELayer", "ModelOutput", "Router", "RouterStats", "Routing", "Transformer", "build_model"]
