"""Image data sets: pixels in memory, with how the model wants them normalised.

:func:`load_images` reads any of

* a folder of image files (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.gif``, ``.webp``); class
  subfolders (``root/cat/1.png``) give labels, numbered in sorted folder order;
* a NumPy array ``[n, H, W]``, ``[n, H, W, C]`` or ``[n, C, H, W]`` (uint8 as 0..255, floats as
  0..1), or a ``.npy`` file holding one;
* a torchvision-style data set: any object with ``__len__`` and ``__getitem__`` returning
  ``(image, label)`` (a PIL image, an array or a ``[C, H, W]`` tensor);
* a Hugging Face data set saved with ``save_to_disk`` (its ``image``/``img`` and ``label``
  columns).

Every image becomes ``float32 [C, H, W]`` in 0..1, resized (bilinear, antialiased) to the model's
size; what the model sees is ``(pixels − mean) / std`` (:meth:`Images.normalised`), with mean,
std and size from the model directory's ``preprocessor_config.json`` when it has one, else the
arguments (default: no normalisation, the images' own size). Reading image files needs Pillow
(``pip install 'actscope[vision]'``). The whole set is held in memory: ``limit`` caps it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import DataError, InputError

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
PIL_HINT = "reading image files needs Pillow: pip install 'actscope[vision]'"


@dataclass(frozen=True)
class Preprocess:
    """How pixels in 0..1 become the model's input: resize to ``size``, then ``(x − mean) / std``."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    channels: int | None = None

    def checked(self) -> "Preprocess":
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise InputError(f"--image-size must be one or two positive whole numbers, got {self.size!r}")
        if any(s <= 0 for s in self.std):
            raise InputError(f"--image-std must be positive, got {self.std!r}")
        return self


@dataclass(frozen=True, eq=False)
class Images:
    """``pixels [n, C, H, W]`` float32 in 0..1, ``labels [n]`` (-1 when unknown), a name per image."""

    pixels: torch.Tensor
    labels: np.ndarray
    names: list[str]
    preprocess: Preprocess = field(default_factory=Preprocess)
    source: str = "images"
    classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def normalised(self, index: slice | Sequence[int] | torch.Tensor = slice(None)) -> torch.Tensor:
        """What the model sees: ``(pixels − mean) / std`` of the chosen images."""
        x = self.pixels[index]
        mean = torch.tensor(self.preprocess.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.preprocess.std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    @property
    def fingerprint(self) -> str:
        import hashlib

        digest = hashlib.sha256(self.pixels.numpy().tobytes())
        digest.update(json.dumps([self.preprocess.mean, self.preprocess.std]).encode())
        return digest.hexdigest()[:16]


def load_images(data: Any, *, preprocess: Preprocess | None = None, model_dir: str | os.PathLike | None = None,
                limit: int | None = None) -> Images:
    """Read ``data`` (see the module docstring) into :class:`Images`; ``model_dir``'s
    ``preprocessor_config.json`` supplies size, mean and std the arguments do not."""
    if isinstance(data, Images):
        return data
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"--max-images must be a whole number of at least 1, got {limit!r}")
    chosen = _merged(preprocess or Preprocess(), model_dir).checked()
    arrays, labels, names, classes, source = _read(data, limit)
    if not arrays:
        raise DataError(f"{source} holds no image; pass a folder of image files, an array or a data set with images")
    pixels = _stack(arrays, chosen)
    return Images(pixels, np.asarray(labels, dtype=np.int64), names, chosen, source, tuple(classes))


def is_image_data(data: Any) -> bool:
    """Whether ``data`` is image data (not text): Images, an array, a data set of (image, label),
    a folder holding image files, an ``.npy`` file, or a saved data set with an image column."""
    if isinstance(data, (Images, np.ndarray)):
        return True
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.suffix.lower() == ".npy" or path.suffix.lower() in SUFFIXES:
            return True
        if path.is_dir():
            return _saved_image_dataset(path) or any(_image_files(path)[:1])
        return False
    if isinstance(data, (list, tuple, dict, str, torch.Tensor)) or data is None:
        return False
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")) or hasattr(data, "documents"):
        return False
    try:
        first = data[0] if len(data) else None
    except Exception:  # noqa: BLE001 - not indexable by position: not a data set of images
        return False
    return _is_image_item(first)


def _is_image_item(item: Any) -> bool:
    """An (image, label) pair, an image, or a row with an image column."""
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    if isinstance(item, Mapping):
        return any(key in item for key in ("image", "img"))
    if hasattr(item, "convert") and hasattr(item, "mode"):  # a PIL image
        return True
    if torch.is_tensor(item):
        return item.dim() in (2, 3) and (item.is_floating_point() or item.dtype == torch.uint8)
    if isinstance(item, np.ndarray):
        return item.ndim in (2, 3) and (item.dtype == np.uint8 or np.issubdtype(item.dtype, np.floating))
    return False


def preprocess_from(model_dir: str | os.PathLike | None) -> dict[str, Any]:
    """Size, mean and std from a model directory's ``preprocessor_config.json`` (empty when none)."""
    if model_dir is None:
        return {}
    path = Path(model_dir) / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise DataError(f"{path} is not valid JSON ({error}); fix or remove it") from None
    found: dict[str, Any] = {}
    size = config.get("size") or config.get("crop_size")
    if isinstance(size, dict):
        size = (size.get("height"), size.get("width")) if "height" in size else (size.get("shortest_edge"),) * 2
    if isinstance(size, int):
        size = (size, size)
    if size and all(isinstance(s, int) for s in size):
        found["size"] = tuple(size)
    if config.get("do_normalize", True) and config.get("image_mean") is not None:
        found["mean"], found["std"] = tuple(config["image_mean"]), tuple(config["image_std"])
    return found


def parse_floats(text: str, flag: str) -> tuple[float, ...]:
    """``"0.5,0.5,0.5"`` → ``(0.5, 0.5, 0.5)``; a bad number is an InputError naming ``flag``."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"{flag} takes numbers separated by commas, e.g. 0.5,0.5,0.5; got {text!r}") from None


def _merged(preprocess: Preprocess, model_dir: Any) -> Preprocess:
    """The arguments, with what they leave at the default taken from the model directory."""
    found = preprocess_from(model_dir)
    default = Preprocess()
    return Preprocess(
        size=preprocess.size if preprocess.size is not None else found.get("size"),
        mean=preprocess.mean if preprocess.mean != default.mean else found.get("mean", default.mean),
        std=preprocess.std if preprocess.std != default.std else found.get("std", default.std),
        channels=preprocess.channels,
    )


# -- readers ---------------------------------------------------------------------------
def _read(data: Any, limit: int | None) -> tuple[list[np.ndarray], list[int], list[str], list[str], str]:
    if isinstance(data, np.ndarray):
        return _from_array(data, limit, "array")
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.suffix.lower() == ".npy":
            if not path.is_file():
                raise InputError(f"{path} does not exist; pass an .npy file of images")
            return _from_array(np.load(path, allow_pickle=False), limit, str(path))
        if path.is_dir() and _saved_image_dataset(path):
            return _from_saved(path, limit)
        if path.is_dir():
            return _from_folder(path, limit)
        raise InputError(f"{path} is not a folder of images, an .npy file or a saved data set")
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return _from_dataset(data, limit, type(data).__name__)
    raise InputError(f"cannot read images from a {type(data).__name__}; pass a folder, an array or a data set of (image, label)")


def _from_array(array: np.ndarray, limit: int | None, source: str) -> tuple:
    if array.ndim not in (3, 4):
        raise DataError(f"an image array must be [n, H, W], [n, H, W, C] or [n, C, H, W]; got shape {array.shape}")
    array = array[:limit]
    names = [f"{source}[{i}]" for i in range(len(array))]
    return [image for image in array], [-1] * len(array), names, [], source


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())


def _from_folder(folder: Path, limit: int | None) -> tuple:
    files = _image_files(folder)[:limit]
    if not files:
        raise DataError(f"{folder} holds no image file ({', '.join(SUFFIXES)}); pass a folder of images")
    classes = sorted({p.parent.relative_to(folder).parts[0] for p in files if p.parent != folder})
    number = {name: i for i, name in enumerate(classes)}
    labels = [number.get(p.relative_to(folder).parts[0], -1) if p.parent != folder else -1 for p in files]
    return [_read_file(p) for p in files], labels, [str(p.relative_to(folder)) for p in files], classes, str(folder)


def _read_file(path: Path) -> np.ndarray:
    image = _pil().open(path)
    image.load()
    return np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise InputError(PIL_HINT) from None
    return Image


def _saved_image_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _from_saved(path: Path, limit: int | None) -> tuple:
    try:
        from datasets import load_from_disk
    except ImportError:
        raise InputError("reading a saved data set needs the datasets package: pip install 'actscope[data]'") from None
    dataset = load_from_disk(str(path))
    if hasattr(dataset, "keys") and not hasattr(dataset, "column_names"):  # a DatasetDict: its first split
        dataset = dataset[sorted(dataset.keys())[0]]
    columns = dataset.column_names
    image = next((c for c in ("image", "img", "pixel_values") if c in columns), None)
    if image is None:
        raise DataError(f"{path} has no image column (columns: {', '.join(columns)}); it needs one named image or img")
    label = next((c for c in ("label", "labels") if c in columns), None)
    rows = dataset.select(range(min(len(dataset), limit or len(dataset))))
    arrays = [_as_array(value) for value in rows[image]]
    labels = [int(v) for v in rows[label]] if label else [-1] * len(arrays)
    feature = dataset.features.get(label) if label else None
    classes = list(getattr(feature, "names", None) or [])
    return arrays, labels, [f"{path.name}[{i}]" for i in range(len(arrays))], classes, str(path)


def _from_dataset(dataset: Any, limit: int | None, source: str) -> tuple:
    count = min(len(dataset), limit or len(dataset))
    arrays, labels = [], []
    for i in range(count):
        item = dataset[i]
        if isinstance(item, Mapping):  # a row of a data set object (e.g. datasets.Dataset)
            item = (item.get("image", item.get("img")), item.get("label", item.get("labels", -1)))
        image, label = (item[0], item[1]) if isinstance(item, (tuple, list)) and len(item) >= 2 else (item, -1)
        arrays.append(_as_array(image))
        labels.append(int(label) if isinstance(label, (int, np.integer)) or (torch.is_tensor(label) and label.numel() == 1) else -1)
    return arrays, labels, [f"{source}[{i}]" for i in range(count)], list(getattr(dataset, "classes", []) or []), source


def _as_array(image: Any) -> np.ndarray:
    if torch.is_tensor(image):
        return image.detach().cpu().numpy()
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        return np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
    return np.asarray(image)


# -- to one tensor ---------------------------------------------------------------------
def _stack(arrays: list[np.ndarray], preprocess: Preprocess) -> torch.Tensor:
    """Each array → float32 [C, H, W] in 0..1, resized to the target size; then one tensor."""
    tensors = [_chw(a) for a in arrays]
    size = preprocess.size or tuple(tensors[0].shape[1:])
    channels = preprocess.channels or max(t.shape[0] for t in tensors)
    resized = []
    for t in tensors:
        t = _channels(t, channels)
        if tuple(t.shape[1:]) != tuple(size):
            t = torch.nn.functional.interpolate(t[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0]
        resized.append(t.clamp(0, 1))
    return torch.stack(resized).contiguous()


def _chw(array: np.ndarray) -> torch.Tensor:
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    x = torch.as_tensor(np.asarray(array, dtype=np.float32) / scale)
    if x.dim() == 2:
        return x[None]
    if x.dim() != 3:
        raise DataError(f"an image must be [H, W], [H, W, C] or [C, H, W]; got shape {tuple(x.shape)}")
    if x.shape[0] not in (1, 3) and x.shape[-1] in (1, 3, 4):
        x = x.permute(2, 0, 1)  # [H, W, C] → [C, H, W] (grey and RGB first axes read as channels)
    return x[:3] if x.shape[0] == 4 else x  # drop alpha


def _channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    if x.shape[0] == channels:
        return x
    if x.shape[0] == 1:
        return x.expand(channels, *x.shape[1:])
    if channels == 1:
        return x.mean(0, keepdim=True)
    raise DataError(f"an image has {x.shape[0]} channels and the model takes {channels}")
