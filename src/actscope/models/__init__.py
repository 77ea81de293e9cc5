"""Models: loading, the Model wrapper and the per-family adapter tables."""
from .loading import ModelLike, as_model, default_model_dir, load, wrap
from .model import Model, SiteEntry, resolve_module

__all__ = ["Model", "ModelLike", "SiteEntry", "as_model", "default_model_dir", "load", "resolve_module", "wrap"]
