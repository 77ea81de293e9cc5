"""Top-activating images: each top example of a run fed images, as a small PNG of what the unit saw.

:func:`image_examples` turns the rows of a run's ``examples`` table (site, unit, rank, doc = image,
pos = position) into the ``images`` table: the box of the input the position sees (a conv map's
receptive field, :mod:`.receptive`; a ViT patch; the whole image for a site without positions or
with ``spatial="mean"``) and a PNG thumbnail, at most ``size`` pixels a side: a conv unit's crop,
or for a ViT the whole image with the patch outlined. With ``spatial="max"`` the run recorded one
value per image, so the position is found again (one forward pass over the top images).
Thumbnails are added strongest rank first over all units until ``max_bytes`` is spent.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..drawing.png import png_bytes
from ..errors import InputError
from ..feeding import image_key
from ..models import Model
from ..sites import Plan, Site
from .receptive import patch_box, receptive_field

THUMB = 48  # pixels a side at most
MAX_BYTES = 4_000_000  # PNG bytes a run keeps in all
OUTLINE = (1.0, 0.45, 0.1)  # the colour of a ViT patch's outline

Box = Callable[[int], tuple[int, int, int, int]]


def image_examples(model: Model, plan: Plan, examples: Mapping[str, np.ndarray], images: Any, *, spatial: str = "positions",
                   size: int = THUMB, max_bytes: int = MAX_BYTES) -> dict[str, np.ndarray]:
    """The ``images`` table: site, unit, rank, doc, pos, the box ``y0 x0 y1 x1`` and ``png`` bytes."""
    site_of = np.asarray(examples.get("site", []), dtype=object)
    rows: list[dict[str, Any]] = []
    for site in plan.sites:
        chosen = np.flatnonzero(site_of == site.label)
        if chosen.size:
            rows.extend(_site_rows(model, site, examples, chosen, images, spatial))
    rows.sort(key=lambda r: (r["rank"], r["site"], r["unit"]))
    table: dict[str, list] = {k: [] for k in ("site", "unit", "rank", "doc", "pos", "y0", "x0", "y1", "x1", "png")}
    spent = 0
    for row in rows:
        data = png_bytes(_thumbnail(images.pixels[row["doc"]], row["box"], row["outline"], size))
        if spent + len(data) > max_bytes:
            break
        spent += len(data)
        for key in ("site", "unit", "rank", "doc", "pos"):
            table[key].append(row[key])
        for key, value in zip(("y0", "x0", "y1", "x1"), row["box"]):
            table[key].append(value)
        table["png"].append(data)
    return {k: np.array(v, dtype=object if k in ("site", "png") else np.int64) for k, v in table.items()}


def _site_rows(model: Model, site: Site, examples: Mapping[str, np.ndarray], chosen: np.ndarray, images: Any, spatial: str) -> list[dict]:
    box, outline, raw = site_geometry(model, site, images)
    docs = np.asarray(examples["doc"], dtype=np.int64)[chosen]
    units = np.asarray(examples["unit"], dtype=np.int64)[chosen]
    positions = np.asarray(examples["pos"], dtype=np.int64)[chosen]
    if spatial == "max" and raw.dim() >= 3:
        positions = _argmax_positions(model, site, images, docs, units)
    whole = spatial == "mean" or raw.dim() < 3
    image = tuple(images.pixels.shape[2:])
    return [{"site": site.label, "unit": int(u), "rank": int(r), "doc": int(d), "pos": int(p),
             "box": (0, 0, *image) if whole else box(int(p)), "outline": outline and not whole}
            for u, r, d, p in zip(units, np.asarray(examples["rank"])[chosen], docs, positions)]


def site_geometry(model: Model, site: Site, images: Any) -> tuple[Box, bool, torch.Tensor]:
    """(position → box, whether to outline rather than crop, the site's tensor for image 0)."""
    from ..trace import capture

    key = image_key(model)
    example = images.normalised(slice(0, 1)).to(model.device)
    with torch.no_grad(), capture(model, Plan((site,)), announce=False) as seen:
        model(**{key: example})
    raw = seen.tensor(site.label)
    image = tuple(images.pixels.shape[2:])
    if raw.dim() == 4:
        try:
            field = receptive_field(model.module, model.module.get_submodule(site.path), example, key, site.hook.at)
        except InputError:  # a grid no chain of convolutions reaches: show the whole image
            return (lambda p: (0, 0, *image)), False, raw
        return (lambda p: field.box(p, image)), False, raw
    patch = getattr(model.config, "patch_size", None)
    if raw.dim() == 3 and patch:
        patch = patch if isinstance(patch, int) else patch[0]
        cls = raw.shape[1] - (image[0] // patch) * (image[1] // patch)
        return (lambda p: patch_box(p, image, patch, cls)), True, raw
    return (lambda p: (0, 0, *image)), False, raw


def _argmax_positions(model: Model, site: Site, images: Any, docs: np.ndarray, units: np.ndarray) -> np.ndarray:
    """Where in each image its unit peaks ([n] flattened positions), from one pass over the images."""
    from ..trace import capture

    distinct, back = np.unique(docs, return_inverse=True)
    key = image_key(model)
    with torch.no_grad(), capture(model, Plan((site,)), announce=False) as seen:
        for start in range(0, len(distinct), 32):
            model(**{key: images.normalised(torch.as_tensor(distinct[start:start + 32])).to(model.device)})
    raw = seen.tensor(site.label)
    per_unit = raw.flatten(2) if raw.dim() == 4 else raw.transpose(1, 2)  # [images, units, positions]
    return per_unit[torch.as_tensor(back.reshape(-1)), torch.as_tensor(units)].argmax(-1).numpy()


def _thumbnail(pixels: torch.Tensor, box: tuple[int, int, int, int], outline: bool, size: int) -> np.ndarray:
    """[C, H, W] in 0..1 → [h, w, C]: the crop (or the whole image with the box outlined), scaled
    so its longer side is at most ``size`` (whole-number enlargement of small crops: crisp pixels)."""
    y0, x0, y1, x1 = box
    if outline:
        image = pixels.expand(3, *pixels.shape[1:]).clone() if pixels.shape[0] == 1 else pixels.clone()
        colour = torch.tensor(OUTLINE).view(3, 1)
        image[:, y0, x0:x1] = colour
        image[:, y1 - 1, x0:x1] = colour
        image[:, y0:y1, x0] = colour
        image[:, y0:y1, x1 - 1] = colour
    else:
        image = pixels[:, y0:y1, x0:x1]
    longest = max(image.shape[1:])
    if longest < size:
        factor = size // longest
        image = image.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
    elif longest > size:
        scale = size / longest
        target = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[2] * scale)))
        image = torch.nn.functional.interpolate(image[None], size=target, mode="area")[0]
    return image.permute(1, 2, 0).numpy()


def png_target(target: Any, *, overwrite: bool = False) -> Any:
    """``target`` as a Path, refused (InputError) unless a PNG may be written there: not a folder,
    not an existing file actscope did not write, not an existing one without ``overwrite``, in a
    folder that takes a new file. Commands call it before their long work; :func:`write_png` again."""
    from pathlib import Path

    from ..drawing.png import is_actscope_png
    from ..store.files import check_writable

    target = Path(target)
    if target.is_dir():
        raise InputError(f"--out {target} is a folder; give a file name such as {target / 'sheet.png'}")
    if target.exists() or target.is_symlink():
        with open(target, "rb") as f:
            ours = is_actscope_png(f.read(128))
        if not ours:
            raise InputError(f"{target} exists and was not written by actscope, so it is never replaced; choose another --out")
        if not overwrite:
            raise InputError(f"{target} exists; pass --overwrite to replace it, or choose another --out")
    check_writable(target)
    return target


def write_png(target: Any, image: np.ndarray, *, overwrite: bool = False) -> Any:
    """Write ``image`` ([H, W, C] in 0..1) as a PNG at ``target``, atomically; an existing file is
    replaced only when actscope wrote it and ``overwrite`` is given (:func:`png_target`)."""
    from ..store.files import atomic_file

    target = png_target(target, overwrite=overwrite)
    data = png_bytes(image, marked=True)
    with atomic_file(target, size_hint=len(data)) as partial:
        partial.write_bytes(data)
    return target


def side_by_side(pictures: list[torch.Tensor]) -> np.ndarray:
    """Images ``[C, H, W]`` in 0..1 → one ``[H, W, C]`` array: a single image as it is, several
    left to right in order, 2 white pixels apart (:func:`~actscope.drawing.png.grid`)."""
    from ..drawing.png import grid

    arrays = [p.detach().cpu().permute(1, 2, 0).numpy() for p in pictures]
    return np.asarray(grid(arrays, len(arrays)) if len(arrays) > 1 else arrays[0])


def contact_sheet(table: Mapping[str, Any], columns: int | None = None, size: int = THUMB) -> np.ndarray:
    """The thumbnails of an ``images`` table (rows in order), one unit per row of the sheet,
    its ranks left to right, each centred on a ``size``-pixel tile."""
    from ..drawing.png import grid

    pngs, units = list(table["png"]), [(s, int(u)) for s, u in zip(table["site"], table["unit"])]
    if not pngs:
        raise InputError("there are no thumbnails to put on a sheet (the run kept none for these units)")
    order = list(dict.fromkeys(units))
    width = columns or max(units.count(u) for u in order)
    tiles: list[np.ndarray] = []
    for unit in order:
        row = [_tile(p, size) for p, u in zip(pngs, units) if u == unit][:width]
        tiles += row + [np.ones((size, size, 3), np.float32)] * (width - len(row))
    return grid(tiles, width)


def _tile(data: bytes, size: int) -> np.ndarray:
    from ..drawing.png import read_png

    image = read_png(data)
    image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    tile = np.ones((size, size, 3), np.float32)
    h, w = min(size, image.shape[0]), min(size, image.shape[1])
    top, left = (size - h) // 2, (size - w) // 2
    tile[top:top + h, left:left + w] = image[:h, :w]
    return tile
