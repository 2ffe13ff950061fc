"""The one preprocessing function shared by calibration and validation: letterbox, pad 114, RGB, /255, NCHW.

`letterbox` = `to_chw_float(letterbox_rgb(...))`: engines with a uint8 input take `letterbox_rgb`'s frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PAD_VALUE = 114
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM")  # JPEG, PNG, BMP (WebP: RIFF....WEBP)


@dataclass(frozen=True)
class Letterbox:
    """How an original image maps into the network input: input = original * scale + (pad_x, pad_y)."""

    scale: float
    pad_x: float
    pad_y: float
    original_width: int
    original_height: int


def list_images(folder: Path) -> list[Path]:
    """Image files in `folder`, sorted by name (the order every stage uses)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def looks_like_image(path: Path) -> bool:
    """Whether the file starts like a JPEG, PNG, BMP or WebP image: a cheap check that reads 12 bytes, not the image."""
    try:
        with path.open("rb") as handle:
            head = handle.read(12)
    except OSError:
        return False
    return head.startswith(_IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def read_image(path: Path) -> np.ndarray | None:
    """BGR uint8 HxWx3, or None when the file cannot be decoded. Grayscale images become 3-channel."""
    return decode_image(np.fromfile(str(path), dtype=np.uint8))


def decode_image(data: bytes | np.ndarray) -> np.ndarray | None:
    """`read_image` of a file's bytes already read: BGR uint8 HxWx3, or None when they cannot be decoded."""
    buffer = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    if buffer.size == 0:
        return None
    return cv2.imdecode(buffer, cv2.IMREAD_COLOR)


def letterbox(image_bgr: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping aspect ratio, pad to size x size with 114 (centered), return (CHW float32 RGB /255, mapping)."""
    rgb, box = letterbox_rgb(image_bgr, size)
    return to_chw_float(rgb), box


def letterbox_rgb(image_bgr: np.ndarray, size: int, out: np.ndarray | None = None) -> tuple[np.ndarray, Letterbox]:
    """`letterbox` before its float conversion: (size x size x 3 RGB uint8, mapping). An engine with a uint8 input
    (`tensorrt.input: uint8`) takes these as they are and divides by 255 itself; `to_chw_float` gives `letterbox`'s
    frame. `out` (size x size x 3 uint8, e.g. a slot of a pinned batch buffer) receives the frame, and is returned."""
    height, width = image_bgr.shape[:2]
    fit = letterbox_fit(width, height, size)
    new_width, new_height, top, left = fit.new_width, fit.new_height, fit.top, fit.left
    if (new_width, new_height) != (width, height):
        resized = cv2.resize(image_bgr, (new_width, new_height), interpolation=cv2.INTER_LINEAR)
        rgb = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB, dst=resized)  # in place: one allocation less per image
    else:
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)  # the caller's image stays as it is
    bottom, right = size - new_height - top, size - new_width - left
    # the pad is grey in any channel order, so the colours are swapped before padding (fewer pixels)
    padded = cv2.copyMakeBorder(rgb, top, bottom, left, right, cv2.BORDER_CONSTANT, dst=out, value=(PAD_VALUE,) * 3)
    if out is not None and padded.ctypes.data != out.ctypes.data:  # OpenCV reallocates a dst it cannot write into
        np.copyto(out, padded)
        padded = out
    return padded, fit.mapping


@dataclass(frozen=True)
class LetterboxFit:
    """Where an image of width x height lands in the size x size frame: resized to new_width x new_height, its
    top-left corner at (left, top); `mapping` maps boxes back. The CPU letterbox and the GPU one share it."""

    new_width: int
    new_height: int
    left: int
    top: int
    mapping: Letterbox


def letterbox_fit(width: int, height: int, size: int) -> LetterboxFit:
    """The letterbox geometry of a width x height image in a size x size frame (aspect kept, pad centred)."""
    scale = min(size / height, size / width)
    new_width, new_height = round(width * scale), round(height * scale)
    left, top = round((size - new_width) / 2 - 0.1), round((size - new_height) / 2 - 0.1)
    mapping = Letterbox(scale=scale, pad_x=left, pad_y=top, original_width=width, original_height=height)
    return LetterboxFit(new_width, new_height, left, top, mapping)


def to_chw_float(rgb: np.ndarray) -> np.ndarray:
    """An H x W x 3 RGB uint8 frame as the network's float input: C x H x W float32, divided by 255."""
    return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / 255.0


def to_hwc_uint8(chw: np.ndarray) -> np.ndarray:
    """The inverse of `to_chw_float` for (N x) C x H x W frames: exact, since every value is k / 255 in float32."""
    axes = (0, 2, 3, 1) if chw.ndim == 4 else (1, 2, 0)
    return np.ascontiguousarray(np.rint(chw * 255.0).transpose(axes), dtype=np.uint8)


def load_preprocessed(path: Path, size: int) -> tuple[np.ndarray, Letterbox] | None:
    """Read and letterbox one image; None when unreadable."""
    image = read_image(path)
    if image is None:
        return None
    return letterbox(image, size)


def boxes_to_original(boxes_xyxy: np.ndarray, box: Letterbox) -> np.ndarray:
    """Map xyxy boxes from network-input pixels back to original-image pixels, clipped to the image."""
    out = boxes_xyxy.astype(np.float64, copy=True)
    out[:, [0, 2]] = (out[:, [0, 2]] - box.pad_x) / box.scale
    out[:, [1, 3]] = (out[:, [1, 3]] - box.pad_y) / box.scale
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, box.original_width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, box.original_height)
    return out
