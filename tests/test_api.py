"""The public surface: every documented name imports, and heavy libraries stay lazy."""
from __future__ import annotations

import subprocess
import sys

import actscope

DOCUMENTED = [
    "load", "wrap", "observe", "capture", "edit", "interventions", "profile", "open_run", "plan_sites", "Model", "Run",
    "Plan", "ProfileConfig", "ActscopeError", "InputError", "SiteError", "DataError", "ModelLoadError", "RunDirError",
    "explain", "metrics", "sparse", "train", "harvest", "open_activations", "sae", "load_sae", "train_sae",
]
# The short paths the README teaches: actscope.<package>.<name>.
SHORT_PATHS = {
    "explain": ["decode", "decode_agreement", "top_examples", "contrast", "ablation_effect", "token_probability",
                "activation_patching", "logit_difference", "attribution_patching", "compare_effects", "subspace_patching",
                "learn_subspace", "circuit_overlap", "induction_scores", "steering_vector", "steer", "steering_sweep",
                "logit_lens", "fit_tuned_lens", "lens_kl", "attention_patterns"],
    "metrics": ["activation_sparsity", "cett_sparsity", "CausalLMLoss", "CettThresholds", "temporal_sparsity", "core_neurons",
                "activation_codes", "neuron_sensitivity", "eigenscore", "extreme_tokens", "outlier_channels",
                "activation_memory", "moe_routing", "cka", "rsa", "effective_rank", "participation_ratio",
                "compare_representations", "ridge_cv", "encoding_scores", "load_responses", "noise_ceiling", "module_drift"],
    "sparse": ["calibrate", "Calibration", "sparsify", "evaluate", "dense_with_thresholds"],
    "sae": ["load_sae", "attach", "reconstruction", "train_sae", "save_sae", "SAE", "Reconstruction", "TrainedSAE"],
}


def test_documented_names_are_exported():
    for name in DOCUMENTED:
        assert hasattr(actscope, name), name
        assert name in actscope.__all__, name


def test_short_paths_reach_every_public_function():
    for package, names in SHORT_PATHS.items():
        module = getattr(actscope, package)
        assert set(names) <= set(module.__all__), package
        for name in module.__all__:
            assert callable(getattr(module, name)), f"actscope.{package}.{name}"


def test_import_is_lazy():
    code = "import sys, actscope; print(sorted(m for m in ('transformers','pandas','pyarrow','matplotlib','datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_hub_name_is_refused_with_the_fix():
    import pytest

    with pytest.raises(actscope.ModelLoadError, match="is not in the local cache") as error:
        actscope.load("gpt2-org/some-model")
    assert "--local-dir" in str(error.value) and "download=True" in str(error.value)


def test_directory_without_config(tmp_path):
    import pytest

    with pytest.raises(actscope.ModelLoadError, match="no config.json"):
        actscope.load(tmp_path)
