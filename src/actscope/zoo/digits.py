"""A small CNN trained here on scikit-learn's handwritten digits (8×8 grey, 1797 images; shipped
with scikit-learn, no download), for the vision tools' tests, reproductions and docs.

:func:`train_digits_cnn` trains (or reuses) it under the zoo cache; :func:`load_digits_cnn` returns
the module; :func:`digit_images` the images as :class:`actscope.data.images.Images` (pixels 0..1,
the first fifth held out for evaluation). ``task`` chooses what it learns: ``"digits"`` (the ten
classes), ``"low"`` / ``"high"`` (digits 0–4 / 5–9 only) or ``"bars"`` (synthetic 8×8 images of
oriented bars, 4 orientations): two similar tasks and a different one, for comparing filters.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from actscope.errors import InputError
from actscope.zoo.cache import holds_model, train_cached, write_meta, zoo_dir

VERSION = "1"
TASKS = ("digits", "low", "high", "bars")


@dataclass(frozen=True)
class DigitsConfig:
    task: str = "digits"
    channels: tuple[int, int, int] = (8, 16, 32)
    epochs: int = 30
    lr: float = 3e-3
    seed: int = 0


class DigitsCNN(nn.Sequential):
    """conv3×3 → ReLU → conv3×3 → ReLU → maxpool 2 → conv3×3 → ReLU → global mean → linear."""

    def __init__(self, channels: tuple[int, int, int] = (8, 16, 32), classes: int = 10) -> None:
        a, b, c = channels
        super().__init__(nn.Conv2d(1, a, 3, padding=1), nn.ReLU(), nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(b, c, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


def task_data(task: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(images [n, 8, 8] float32 in 0..1, labels [n])`` of a task."""
    if task not in TASKS:
        raise InputError(f"unknown digits task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "bars":
        return _bars(1000, seed)
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)
    keep = {"digits": labels >= 0, "low": labels < 5, "high": labels >= 5}[task]
    labels = labels[keep] - (5 if task == "high" else 0)
    return images[keep], labels


def _bars(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy 8×8 images of one bar at a random place, one of 4 orientations (the label)."""
    rng = np.random.default_rng(1000 + seed)
    labels = rng.integers(0, 4, n)
    images = rng.random((n, 8, 8)).astype(np.float32) * 0.3
    ys, xs = np.mgrid[0:8, 0:8]
    for i, label in enumerate(labels):
        cy, cx = rng.uniform(2, 6, 2)
        angle = np.pi * label / 4
        distance = np.abs(-(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle))
        along = np.abs((xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle))
        images[i][(distance < 0.8) & (along < 3)] = 1.0
    return images, labels.astype(np.int64)


def _split(n: int) -> tuple[np.ndarray, np.ndarray]:
    held = n // 5
    return np.arange(held, n), np.arange(held)  # (train, held out): the first fifth held out


def default_dir(cfg: DigitsConfig) -> Path:
    return zoo_dir(f"digits-cnn-{cfg.task}-s{cfg.seed}")


def train_digits_cnn(cfg: DigitsConfig | None = None, out_dir: Any = None, force: bool = False) -> Path:
    """Train (or reuse) the CNN of ``cfg`` under the zoo cache; return its directory."""
    cfg = cfg or DigitsConfig()
    task_data(cfg.task)  # an unknown task fails here
    return train_cached(out_dir, default_dir(cfg), lambda tmp: _train_into(tmp, cfg),
                        lambda path: holds_model(path, VERSION, _json(cfg), files=("model.safetensors",)),
                        force=force, caller="train_digits_cnn", what="a trained digits CNN")


def load_digits_cnn(cfg: DigitsConfig | None = None) -> DigitsCNN:
    """The trained CNN of ``cfg`` (trained first if not cached), in eval mode."""
    from safetensors.torch import load_file

    cfg = cfg or DigitsConfig()
    path = train_digits_cnn(cfg)
    model = DigitsCNN(cfg.channels, _classes(cfg.task))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval()


def digit_images(task: str = "digits", held_out: bool = False) -> Any:
    """A task's images as :class:`~actscope.data.images.Images` (the training part, or the held-out fifth)."""
    from actscope.data.images import load_images

    images, labels = task_data(task)
    train, held = _split(len(images))
    chosen = held if held_out else train
    loaded = load_images(images[chosen])
    from dataclasses import replace

    return replace(loaded, labels=labels[chosen], source=f"sklearn digits ({task})", classes=tuple(str(c) for c in range(_classes(task))))


def _classes(task: str) -> int:
    return {"digits": 10, "low": 5, "high": 5, "bars": 4}[task]


def _json(cfg: DigitsConfig) -> dict:
    return {**asdict(cfg), "channels": list(cfg.channels)}


def _train_into(tmp: Path, cfg: DigitsConfig) -> None:
    from safetensors.torch import save_file

    started = time.perf_counter()
    images, labels = task_data(cfg.task, cfg.seed)
    train, held = _split(len(images))
    x = torch.as_tensor(images)[:, None]
    y = torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = DigitsCNN(cfg.channels, _classes(cfg.task))
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    for _ in range(cfg.epochs):
        order = torch.as_tensor(train)[torch.randperm(len(train), generator=generator)]
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x[held]).argmax(-1) == y[held]).float().mean())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    write_meta(tmp, {"version": VERSION, "kind": "digits-cnn", "config": _json(cfg), "held_out_accuracy": round(accuracy, 4),
                     "train_seconds": round(time.perf_counter() - started, 2), "torch_version": torch.__version__})


__all__ = ["DigitsCNN", "DigitsConfig", "TASKS", "digit_images", "load_digits_cnn", "task_data", "train_digits_cnn"]
