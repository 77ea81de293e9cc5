"""Sparse autoencoder and transcoder features as units, everywhere a neuron is.

``load_sae(dir)`` reads a SAELens SAE (``cfg.json`` + ``sae_weights.safetensors``);
``attach(model, sae)`` makes its features a site (``blocks.3.resid.post.sae``) that profiling,
statistics, top examples, ``edit``, patching and decoding take like any other;
``reconstruction(model, sae, data)`` measures how well it reconstructs its site; ``train_sae``
trains a small one (ReLU + L1, or top-k) on harvested or streamed activations and saves it in the
SAELens layout.
"""
from __future__ import annotations

from .attach import attach
from .core import SAE
from .files import load_sae
from .quality import Reconstruction, reconstruction
from .save import save_sae
from .train import TrainedSAE, train_sae

__all__ = ["SAE", "Reconstruction", "TrainedSAE", "attach", "load_sae", "reconstruction", "save_sae", "train_sae"]
