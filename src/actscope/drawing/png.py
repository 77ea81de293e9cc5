"""PNG files without an imaging library: :func:`png_bytes` encodes an 8-bit grey or RGB image
(a NumPy array, zlib-compressed, no filtering), :func:`grid` tiles images into a contact sheet."""
from __future__ import annotations

import struct
import zlib

import numpy as np


MARKER = b"Software\x00actscope"  # the tEXt chunk that says actscope wrote a file


def png_bytes(image: np.ndarray, *, marked: bool = False) -> bytes:
    """``image`` [H, W] or [H, W, 1|3], uint8 or floats in 0..1 → the bytes of a PNG file
    (``marked``: with a ``Software: actscope`` text chunk, :func:`is_actscope_png`)."""
    pixels = _uint8(image)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    height, width = pixels.shape[:2]
    colour = 0 if pixels.ndim == 2 else 2  # grey or RGB
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels.reshape(height, -1)], axis=1)  # filter byte 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    text = _chunk(b"tEXt", MARKER) if marked else b""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + text + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + _chunk(b"IEND", b"")


def is_actscope_png(head: bytes) -> bool:
    """Whether a file's first bytes are a PNG that :func:`png_bytes` marked."""
    return head.startswith(b"\x89PNG") and b"tEXt" + MARKER in head[:128]


def grid(images: list[np.ndarray], columns: int, pad: int = 2, fill: float = 1.0) -> np.ndarray:
    """``images`` (equal shape [H, W, C], floats in 0..1) tiled row by row, ``pad`` pixels apart."""
    if not images:
        raise ValueError("grid() needs at least one image")
    height, width, channels = images[0].shape
    rows = -(-len(images) // columns)
    sheet = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, channels), fill, dtype=np.float32)
    for i, image in enumerate(images):
        top, left = pad + (i // columns) * (height + pad), pad + (i % columns) * (width + pad)
        sheet[top:top + height, left:left + width] = image
    return sheet


def _uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    return np.ascontiguousarray(np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def read_png(data: bytes) -> np.ndarray:
    """The pixels ([H, W, C] floats in 0..1) of a PNG that :func:`png_bytes` wrote (8-bit grey or
    RGB, filter 0); other PNGs are refused."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("not a PNG file")
    at, chunks, idat = 8, {}, b""
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        chunks.setdefault(kind, body)
        idat += body if kind == b"IDAT" else b""
        at += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    channels = {0: 1, 2: 3}.get(colour)
    if depth != 8 or channels is None:
        raise ValueError("only 8-bit grey or RGB PNGs are read here")
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * channels)
    if rows[:, 0].any():
        raise ValueError("only unfiltered PNGs (as png_bytes writes) are read here")
    return rows[:, 1:].reshape(height, width, channels).astype(np.float32) / 255.0
