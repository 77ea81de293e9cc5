"""Small trained models for testing actscope on real, trained activations.

:func:`tiny_lm` gives the directory of a tiny Llama-style causal LM trained (once, then cached)
on the synthetic language of :mod:`actscope.zoo.synthetic`, in a ReLU or SiLU variant, loadable
with ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer``.
"""
from actscope.zoo.lm import held_out_corpus, tiny_lm, train_tiny_lm
from actscope.zoo.synthetic import generate_corpus
from actscope.zoo.tokenizer import build_tokenizer

__all__ = ["tiny_lm", "train_tiny_lm", "generate_corpus", "held_out_corpus", "build_tokenizer"]
