"""SAM2 models: the registry of known weights, the per-user weight cache, and building a predictor."""

from sslmedsam2.models.registry import MODELS, ModelSpec, get_model

__all__ = ["MODELS", "ModelSpec", "get_model"]
