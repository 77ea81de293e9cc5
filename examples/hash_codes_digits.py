"""Reproduction (c): a trained ReLU MLP read as a hash encoder (METHODS.md, "Activation codes").

Claims checked, on the TRAINING set of scikit-learn's bundled ``load_digits`` (no download):

1. the redundancy ratio of the activation codes is below 0.05 (almost every training example
   lies in a linear region of its own);
2. a 9-NN classifier with Hamming distance on the codes is within 5 points of the model's own
   test accuracy (the codes carry the class information).

The MLP is 64-256-256-10 with ReLU, trained with Adam (seeded) on a fixed stratified 75/25
split; the code of an image is the firing pattern of both hidden ReLU layers (512 units,
constant units dropped). The 9-NN score comes from ``ActivationCodes.categorise``, which splits
the training-set codes again (stratified, a quarter held out, seed 0). The trained weights are
cached under ``$ACTSCOPE_CACHE`` (default ``~/.cache/actscope``); ``--retrain`` ignores the cache.

    PYTHONPATH=src .venv/bin/python examples/hash_codes_digits.py
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

import actscope
from actscope.metrics import activation_codes

CONFIG = {"seed": 0, "hidden": 256, "epochs": 30, "batch_size": 64, "lr": 1e-3, "test_size": 0.25, "version": 1}
MAX_REDUNDANCY = 0.05
MAX_GAP = 0.05  # 5 accuracy points


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # [1797, 64] pixel values 0-16 → 0-1
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=CONFIG["test_size"], stratify=digits.target, random_state=CONFIG["seed"]
    )
    return torch.from_numpy(x_train), torch.from_numpy(x_test), torch.from_numpy(y_train), torch.from_numpy(y_test)


def build_mlp() -> torch.nn.Sequential:
    hidden = CONFIG["hidden"]
    return torch.nn.Sequential(OrderedDict(
        fc1=torch.nn.Linear(64, hidden), relu1=torch.nn.ReLU(),
        fc2=torch.nn.Linear(hidden, hidden), relu2=torch.nn.ReLU(),
        out=torch.nn.Linear(hidden, 10),
    ))


def train(x: torch.Tensor, y: torch.Tensor) -> torch.nn.Sequential:
    torch.manual_seed(CONFIG["seed"])
    net = build_mlp()
    optimiser = torch.optim.Adam(net.parameters(), lr=CONFIG["lr"])
    order = torch.Generator().manual_seed(CONFIG["seed"])
    for _ in range(CONFIG["epochs"]):
        for batch in torch.randperm(len(x), generator=order).split(CONFIG["batch_size"]):
            loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return net.eval()


def cache_dir() -> Path:
    key = hashlib.sha256(json.dumps(CONFIG, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(os.environ.get("ACTSCOPE_CACHE", "~/.cache/actscope")).expanduser()
    return root / "examples" / f"hash-codes-digits-{key}"


def trained_mlp(x: torch.Tensor, y: torch.Tensor, retrain: bool) -> tuple[torch.nn.Sequential, str]:
    """The cached MLP, or a freshly trained one published atomically (temp dir, rename)."""
    target = cache_dir()
    if (target / "model.pt").is_file() and not retrain:
        net = build_mlp()
        net.load_state_dict(torch.load(target / "model.pt", weights_only=True))
        return net.eval(), f"cached ({target})"
    net = train(x, y)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    torch.save(net.state_dict(), tmp / "model.pt")
    (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2))
    if retrain and target.exists():
        shutil.rmtree(target)
    try:
        os.rename(tmp, target)
    except OSError:  # another process published the same model first
        shutil.rmtree(tmp, ignore_errors=True)
    return net, f"trained now, cached at {target}"


def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(dim=1) == y).float().mean())


def main() -> int:
    from threadpoolctl import threadpool_limits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retrain", action="store_true", help="train again instead of using the cached MLP")
    args = parser.parse_args()
    # One thread everywhere: on a small shared machine, multi-threaded BLAS/OpenMP pools wait
    # on each other and made the scikit-learn fits ~50x slower; at this size one thread is quick.
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        return report(args.retrain)


def report(retrain: bool) -> int:
    start = time.perf_counter()
    x_train, x_test, y_train, y_test = digits_split()
    net, origin = trained_mlp(x_train, y_train, retrain)
    test_accuracy = accuracy(net, x_test, y_test)

    codes = activation_codes(actscope.wrap(net), x_train, "module:relu1@output,module:relu2@output")
    scores = codes.categorise(y_train.numpy(), seed=0)
    gap = abs(scores.knn9_hamming_accuracy - test_accuracy)

    print(f"model: 64-{CONFIG['hidden']}-{CONFIG['hidden']}-10 ReLU MLP, {origin}")
    print(f"digits: {len(x_train)} training / {len(x_test)} test images; codes on the training set")
    print(f"code bits: {sum(codes.site_bits)} units, {codes.dropped_constant} constant dropped, {codes.n_bits} kept")
    print(f"categorise split of the training codes: {scores.n_train} fit / {scores.n_test} scored")
    print()
    rows = [
        ("model train accuracy", accuracy(net, x_train, y_train), ""),
        ("model test accuracy", test_accuracy, ""),
        ("distinct codes", f"{codes.n_distinct} / {codes.n_codes}", ""),
        ("redundancy ratio", codes.redundancy_ratio, _verdict(codes.redundancy_ratio < MAX_REDUNDANCY, f"< {MAX_REDUNDANCY}")),
        ("9-NN Hamming accuracy (codes)", scores.knn9_hamming_accuracy, ""),
        ("|9-NN − test accuracy|", gap, _verdict(gap <= MAX_GAP, f"<= {MAX_GAP}")),
        ("k-means purity (codes)", scores.kmeans_purity, ""),
        ("logistic accuracy (codes)", scores.logistic_accuracy, ""),
    ]
    for name, value, verdict in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"{name:<32}{shown:>12}  {verdict}")
    print(f"\nwall time: {time.perf_counter() - start:.1f} s")
    passed = codes.redundancy_ratio < MAX_REDUNDANCY and gap <= MAX_GAP
    return 0 if passed else 1


def _verdict(ok: bool, claim: str) -> str:
    return f"claim {claim}: {'PASS' if ok else 'FAIL'}"


if __name__ == "__main__":
    sys.exit(main())
