"""JPEG decoding and letterboxing on the GPU: nvJPEG decodes a batch of files straight into device memory and one
small CUDA kernel letterboxes every image into an engine's uint8 (N, H, W, 3) RGB input buffer, so the frames never
come back to the host (`Detector.load(..., decode="gpu")`, `yoloq predict --decode gpu`).

Why: on the 16-core H200 host, decoding JPEGs on the CPU caps a batch-32 INT8 engine at about 1,750 images/s end to
end, where the engine runs 9,000 (README, "End-to-end speed"). nvJPEG (part of every CUDA toolkit; its batched API
uses the GPU's hardware JPEG decoders where there are some) removes that bound.

What it uses, all through ctypes, from the machine's CUDA toolkit (no new Python dependency):
- libnvjpeg: `nvjpegCreateEx` (hardware backend, else the default one), `nvjpegDecodeBatchedInitialize`,
  `nvjpegDecodeBatched` with interleaved RGB output (NVJPEG_OUTPUT_RGBI);
- libnvrtc + the driver API (libcuda): the letterbox kernel is compiled once per process for the GPU at hand and
  launched with `cuLaunchKernel` on the engine's stream;
- the CUDA runtime the TensorRT runner already uses (device memory, copies).

The kernel resizes with OpenCV's INTER_LINEAR arithmetic (pixel-centre mapping, 11-bit fixed-point weights, the
rounding of OpenCV's SIMD row pass; an exact 2x reduction averages 2 x 2 pixels, as OpenCV does) and pads with 114,
in the geometry of `yoloq.preprocess.letterbox_fit`: `reference_letterbox` is the same arithmetic in NumPy, which the
tests hold against `cv2.resize`. Pixels: on the H200's hardware decoder, nvJPEG gave exactly OpenCV's pixels for
4:4:4 COCO files; its 4:2:0 chroma upsampling differs from libjpeg-turbo's by a few levels (README: the mAP
measured both ways). Files the GPU path does not take are decoded on the CPU by OpenCV (as `read_image`) and
uploaded, so every readable image is taken: not baseline JPEG, grayscale, unusual chroma subsampling, RGB-coded, an
EXIF rotation (OpenCV applies it, nvJPEG does not), a file without its end marker (nvJPEG decodes it, OpenCV
rejects it).
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from yoloq.backends.tensorrt.cuda import check_runtime
from yoloq.errors import BackendUnavailable
from yoloq.preprocess import PAD_VALUE, Letterbox, decode_image, letterbox_fit

_NVJPEG_BACKEND_DEFAULT = 0
_NVJPEG_BACKEND_HARDWARE = 3
_NVJPEG_OUTPUT_RGBI = 5
_CUDA_MEMCPY_HOST_TO_DEVICE = 1
_CUDA_MEMCPY_DEVICE_TO_HOST = 2
_ALIGN = 256
_LIBRARY_DIRS = ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib")
_ITEM = np.dtype(
    [("src", "<u8"), ("width", "<i4"), ("height", "<i4"), ("pitch", "<i4"), ("new_width", "<i4"),
     ("new_height", "<i4"), ("left", "<i4"), ("top", "<i4"), ("unused", "<i4")]
)  # fmt: skip

KERNEL_SOURCE = r"""
struct Item { const unsigned char* src; int width, height, pitch, new_width, new_height, left, top, unused; };

__device__ void coefficients(int d, float scale, int size, int* s, int* a0) {
    // OpenCV INTER_LINEAR: pixel-centre mapping, clamped at the borders, 11-bit weights rounded to nearest even
    float f = (float)((d + 0.5) * (double)scale - 0.5);
    int i = (int)floorf(f);
    f -= (float)i;
    if (i < 0) { f = 0.f; i = 0; }
    if (i >= size - 1) { f = 0.f; i = size - 1; }
    *s = i;
    *a0 = __float2int_rn((1.f - f) * 2048.f);
}

extern "C" __global__ void letterbox(const Item* items, unsigned char* frames, int size, int pad) {
    int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y * blockDim.y + threadIdx.y, n = blockIdx.z;
    if (x >= size || y >= size) return;
    const Item it = items[n];
    unsigned char* out = frames + (((size_t)n * size + y) * size + x) * 3;
    int dx = x - it.left, dy = y - it.top;
    if (dx < 0 || dy < 0 || dx >= it.new_width || dy >= it.new_height) { out[0] = out[1] = out[2] = pad; return; }
    if (it.width == 2 * it.new_width && it.height == 2 * it.new_height) {  // OpenCV's exact 2x: area average
        const unsigned char* p = it.src + (size_t)(2 * dy) * it.pitch + 2 * dx * 3;
        for (int c = 0; c < 3; ++c)
            out[c] = (p[c] + p[c + 3] + p[it.pitch + c] + p[it.pitch + c + 3] + 2) >> 2;
        return;
    }
    int sx, sy, a0, b0;
    coefficients(dx, (float)((double)it.width / it.new_width), it.width, &sx, &a0);
    coefficients(dy, (float)((double)it.height / it.new_height), it.height, &sy, &b0);
    int sx1 = min(sx + 1, it.width - 1), sy1 = min(sy + 1, it.height - 1), a1 = 2048 - a0, b1 = 2048 - b0;
    const unsigned char* r0 = it.src + (size_t)sy * it.pitch;
    const unsigned char* r1 = it.src + (size_t)sy1 * it.pitch;
    for (int c = 0; c < 3; ++c) {
        int h0 = r0[sx * 3 + c] * a0 + r0[sx1 * 3 + c] * a1;
        int h1 = r1[sx * 3 + c] * a0 + r1[sx1 * 3 + c] * a1;
        int v = ((((h0 >> 4) * b0) >> 16) + (((h1 >> 4) * b1) >> 16) + 2) >> 2;
        out[c] = (unsigned char)min(max(v, 0), 255);
    }
}
"""


class GpuDecodeUnavailable(BackendUnavailable):
    """nvJPEG, NVRTC or the CUDA driver cannot be used here; the message says which and what to do."""


class JpegBatchRejected(GpuDecodeUnavailable):
    """nvJPEG failed on a batch (a file whose header looked fine but whose data is not): decode it on the CPU."""


# -- what the CPU decides: which files go to nvJPEG -----------------------------------------------------------------


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's markers say: its frame type (0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...), size,
    component count, the sampling factors (h, v) of each component, the EXIF orientation (1: none) and whether the
    colours are coded as YCbCr (not RGB: an Adobe segment with transform 0, or components named R, G, B)."""

    frame: int
    width: int
    height: int
    sampling: tuple[tuple[int, int], ...]
    orientation: int
    ycbcr: bool = True

    @property
    def on_gpu(self) -> bool:
        """Whether nvJPEG's batched (hardware) decoder takes it and decodes what OpenCV would: a baseline colour
        YCbCr JPEG with 4:4:4, 4:2:2, 4:2:0 or 4:4:0 chroma and no EXIF rotation."""
        if self.frame != 0xC0 or len(self.sampling) != 3 or self.orientation not in (0, 1) or not self.ycbcr:
            return False
        (yh, yv), cb, cr = self.sampling
        return cb == cr == (1, 1) and (yh, yv) in ((1, 1), (2, 1), (2, 2), (1, 2))


def jpeg_header(data: bytes) -> JpegHeader | None:
    """The frame header of a JPEG file's bytes (walking its marker segments up to the frame), or None when it is not
    a JPEG or its markers are broken."""
    if not data.startswith(b"\xff\xd8"):
        return None
    orientation, at, ycbcr = 1, 2, True
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        body = data[at + 4 : at + 2 + length]
        if length < 2 or len(body) != length - 2:
            return None
        if marker == 0xE1 and body.startswith(b"Exif\x00\x00"):
            orientation = exif_orientation(body[6:])
        if marker == 0xEE and body.startswith(b"Adobe") and len(body) >= 12:
            ycbcr = body[11] != 0  # Adobe's colour transform: 0 = none (RGB or CMYK as they are)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT, JPG, DAC)
            if len(body) < 6:
                return None
            height, width, count = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
            components = body[6 : 6 + 3 * count]
            if len(components) != 3 * count:
                return None
            sampling = tuple((components[i + 1] >> 4, components[i + 1] & 15) for i in range(0, 3 * count, 3))
            named_rgb = bytes(components[0 : 3 * count : 3]) == b"RGB"
            return JpegHeader(marker, width, height, sampling, orientation, ycbcr and not named_rgb)
        at += 2 + length
    return None


def exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of an EXIF block's TIFF data, 1 when absent or unreadable."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    for index in range(count):
        entry = ifd + 2 + 12 * index
        if entry + 12 > len(tiff):
            return 1
        tag, kind = struct.unpack_from(order + "HH", tiff, entry)
        if tag == 0x0112 and kind == 3:
            return int(struct.unpack_from(order + "H", tiff, entry + 8)[0])
    return 1


@dataclass(frozen=True)
class EncodedImage:
    """One input as the GPU letterbox takes it: the JPEG's bytes and header (`header.on_gpu`), or the image decoded on
    the CPU (RGB uint8, for every other readable file). Built by `encoded_image`, in the pipeline's threads."""

    width: int
    height: int
    data: bytes | None = None
    rgb: np.ndarray | None = None


def encoded_image(path: Path) -> EncodedImage | None:
    """Read one file for the GPU letterbox; None when it is unreadable (as `read_image`)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    header = jpeg_header(data)
    complete = data.rstrip(b"\x00").endswith(b"\xff\xd9")  # nvJPEG decodes a truncated file that OpenCV rejects
    if header is not None and header.on_gpu and complete and header.width > 0 and header.height > 0:
        return EncodedImage(header.width, header.height, data=data)
    image = decode_image(data)  # the bytes already read: as `read_image`, without reading the file again
    return from_bgr(image) if image is not None else None


def decoded_on_cpu(image: EncodedImage) -> EncodedImage | None:
    """`image` decoded by OpenCV (as `read_image`) when nvJPEG rejected its batch; None when OpenCV cannot either."""
    if image.data is None:
        return image
    decoded = decode_image(image.data)
    return from_bgr(decoded) if decoded is not None else None


def from_bgr(image: np.ndarray) -> EncodedImage:
    """A decoded BGR image for the GPU letterbox (uploaded, then letterboxed like the others)."""
    rgb = np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    return EncodedImage(rgb.shape[1], rgb.shape[0], rgb=rgb)


def arena_layout(images: Sequence[EncodedImage]) -> tuple[list[int], int]:
    """Where each decoded image (RGB, rows of width x 3 bytes) lies in the device arena, and the arena's size."""
    offsets, total = [], 0
    for image in images:
        offsets.append(total)
        total += -(-image.width * image.height * 3 // _ALIGN) * _ALIGN
    return offsets, total


# -- the kernel's arithmetic on the CPU ----------------------------------------------------------------------------


def reference_letterbox(rgb: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """The kernel's letterbox in NumPy (for tests and the on-GPU self-check): size x size x 3 uint8 and the mapping."""
    height, width = rgb.shape[:2]
    fit = letterbox_fit(width, height, size)
    frame = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    if (width, height) == (2 * fit.new_width, 2 * fit.new_height):
        quads = rgb.astype(np.int32).reshape(fit.new_height, 2, fit.new_width, 2, 3).sum(axis=(1, 3))
        resized = ((quads + 2) >> 2).astype(np.uint8)
    else:
        sx, a0 = _coefficients(fit.new_width, width)
        sy, b0 = _coefficients(fit.new_height, height)
        sx1, sy1 = np.minimum(sx + 1, width - 1), np.minimum(sy + 1, height - 1)
        src = rgb.astype(np.int32)
        a0, a1 = a0[None, :, None], 2048 - a0[None, :, None]
        h0 = src[sy][:, sx] * a0 + src[sy][:, sx1] * a1
        h1 = src[sy1][:, sx] * a0 + src[sy1][:, sx1] * a1
        b0, b1 = b0[:, None, None], 2048 - b0[:, None, None]
        resized = np.clip((((h0 >> 4) * b0 >> 16) + ((h1 >> 4) * b1 >> 16) + 2) >> 2, 0, 255).astype(np.uint8)
    frame[fit.top : fit.top + fit.new_height, fit.left : fit.left + fit.new_width] = resized
    return frame, fit.mapping


def _coefficients(new: int, old: int) -> tuple[np.ndarray, np.ndarray]:
    scale = np.float32(old / new)
    f = ((np.arange(new) + 0.5) * np.float64(scale) - 0.5).astype(np.float32)
    index = np.floor(f).astype(np.int64)
    f = f - index.astype(np.float32)
    low, high = index < 0, index >= old - 1
    f[low | high] = 0.0
    index = np.clip(index, 0, old - 1)
    return index, np.rint((np.float32(1.0) - f) * np.float32(2048.0)).astype(np.int32)


# -- the libraries -------------------------------------------------------------------------------------------------


def load_cuda_library(stem: str, majors: Sequence[int] = (13, 12, 11), load: Callable[[str], Any] = ctypes.CDLL) -> Any:
    """A CUDA toolkit library (`stem` "nvjpeg", "nvrtc") by soname, newest major first, then in the toolkit's usual
    folders ($CUDA_HOME/lib64, /usr/local/cuda/lib64); GpuDecodeUnavailable naming what was tried."""
    names = [f"lib{stem}.so.{major}" for major in majors] + [f"lib{stem}.so"]
    folders = [f"{os.environ['CUDA_HOME']}/lib64"] if os.environ.get("CUDA_HOME") else []
    for candidate in names + [f"{folder}/{name}" for folder in [*folders, *_LIBRARY_DIRS] for name in names]:
        try:
            return load(candidate)
        except OSError:
            continue
    raise GpuDecodeUnavailable(
        f"lib{stem} was not found (tried {', '.join(names)} and the CUDA toolkit's lib64): install the CUDA "
        "toolkit's nvJPEG and NVRTC, set CUDA_HOME, or use --decode cpu"
    )


def compile_kernel(nvrtc: Any, compute_capability: str) -> bytes:
    """The letterbox kernel as PTX for this GPU (NVRTC)."""
    program = ctypes.c_void_p()
    _nvrtc(
        nvrtc,
        nvrtc.nvrtcCreateProgram(ctypes.byref(program), KERNEL_SOURCE.encode(), b"letterbox.cu", 0, None, None),
        "nvrtcCreateProgram",
    )
    try:
        option = f"--gpu-architecture=compute_{compute_capability.replace('.', '')}".encode()
        options = (ctypes.c_char_p * 1)(option)
        status = nvrtc.nvrtcCompileProgram(program, 1, options)
        if status != 0:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(program, log)
            raise GpuDecodeUnavailable(f"NVRTC could not compile the letterbox kernel: {log.value.decode()}")
        size = ctypes.c_size_t()
        _nvrtc(nvrtc, nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size)), "nvrtcGetPTXSize")
        ptx = ctypes.create_string_buffer(size.value)
        _nvrtc(nvrtc, nvrtc.nvrtcGetPTX(program, ptx), "nvrtcGetPTX")
        return ptx.raw
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


def _nvrtc(nvrtc: Any, status: int, call: str) -> None:
    if status != 0:
        raise GpuDecodeUnavailable(f"NVRTC call {call} failed with error {status}")


# -- the GPU letterbox ---------------------------------------------------------------------------------------------


class _ImageDesc(ctypes.Structure):
    _fields_ = [("channel", ctypes.c_void_p * 4), ("pitch", ctypes.c_size_t * 4)]  # nvjpegImage_t


class GpuLetterbox:
    """Decodes and letterboxes batches into its own device frame buffers ((max_batch, size, size, 3) uint8, two
    slots), on its own CUDA stream, so the next batch is decoded while the engine runs the current one.

    `cudart` is the CUDA runtime (ctypes) of the consumer (a TensorRT runner's `cudart`). `letterbox(images, slot)`
    queues a batch into slot 0 or 1; `wait(slot, stream)` makes the consumer's stream wait for it; the consumer
    then reads `frames(slot)`. A slot may be refilled once the work that read it has finished. A context manager:
    `close()` frees the device memory, stream, events and nvJPEG handles."""

    def __init__(
        self,
        cudart: Any,
        size: int,
        max_batch: int,
        compute_capability: str,
        libraries: Callable[[str], Any] = load_cuda_library,
    ) -> None:
        self._cudart, self.size, self.max_batch = cudart, size, max_batch
        self._arena, self._arena_bytes, self._items, self._items_count = 0, 0, 0, 0
        self._frames: list[int] = []
        self._events: list[ctypes.c_void_p] = []
        self._stream = ctypes.c_void_p()
        self._handle, self._state, self._batched = ctypes.c_void_p(), ctypes.c_void_p(), 0
        self._module, self._function = ctypes.c_void_p(), ctypes.c_void_p()
        try:
            self._open(libraries, compute_capability)
        except BaseException:
            self.close()
            raise

    def _open(self, libraries: Callable[[str], Any], compute_capability: str) -> None:
        self._nvjpeg = libraries("nvjpeg")
        try:
            self._driver = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise GpuDecodeUnavailable(f"no NVIDIA driver (libcuda.so.1: {exc}): use --decode cpu") from exc
        ptx = compile_kernel(libraries("nvrtc"), compute_capability)
        self._cuda(self._cudart.cudaFree(None), "cudaFree(0)")  # makes the runtime's (primary) context current
        self._cuda(self._cudart.cudaStreamCreate(ctypes.byref(self._stream)), "cudaStreamCreate")
        for _ in range(2):
            self._frames.append(self._malloc(self.max_batch * self.size * self.size * 3))
            event = ctypes.c_void_p()
            self._cuda(self._cudart.cudaEventCreateWithFlags(ctypes.byref(event), 2), "cudaEventCreate")  # no timing
            self._events.append(event)
        self._driver_call(self._driver.cuModuleLoadData(ctypes.byref(self._module), ptx), "cuModuleLoadData")
        self._driver_call(
            self._driver.cuModuleGetFunction(ctypes.byref(self._function), self._module, b"letterbox"),
            "cuModuleGetFunction",
        )
        self.backend = "hardware"
        if self._nvjpeg.nvjpegCreateEx(_NVJPEG_BACKEND_HARDWARE, None, None, 0, ctypes.byref(self._handle)) != 0:
            self.backend = "default"
            self._jpeg(
                self._nvjpeg.nvjpegCreateEx(_NVJPEG_BACKEND_DEFAULT, None, None, 0, ctypes.byref(self._handle)),
                "nvjpegCreateEx",
            )
        self._jpeg(self._nvjpeg.nvjpegJpegStateCreate(self._handle, ctypes.byref(self._state)), "nvjpegJpegStateCreate")

    def __enter__(self) -> GpuLetterbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Wait for queued work, then free the device memory, events, stream, nvJPEG state and handle and the kernel's
        module. Safe to call twice, and after a constructor that failed half-way."""
        if self._stream:
            self._cudart.cudaStreamSynchronize(self._stream)
        for pointer in (self._arena, self._items, *self._frames):
            if pointer:
                self._cudart.cudaFree(ctypes.c_void_p(pointer))
        self._arena = self._items = self._arena_bytes = self._items_count = 0
        self._frames = []
        for event in self._events:
            self._cudart.cudaEventDestroy(event)
        self._events = []
        if self._stream:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = ctypes.c_void_p()
        if self._state:
            self._nvjpeg.nvjpegJpegStateDestroy(self._state)
            self._state = ctypes.c_void_p()
        if self._handle:
            self._nvjpeg.nvjpegDestroy(self._handle)
            self._handle = ctypes.c_void_p()
        if self._module:
            self._driver.cuModuleUnload(self._module)
            self._module = ctypes.c_void_p()

    def frames(self, slot: int) -> int:
        """The device address of frame buffer `slot` (0 or 1): room for max_batch frames."""
        return self._frames[slot]

    def letterbox(self, images: Sequence[EncodedImage], slot: int) -> list[Letterbox]:
        """Queue the decoding and letterboxing of `images` (at most max_batch) into frame buffer `slot` on this
        object's stream, and return their mappings; `wait(slot, stream)` orders a consumer after it."""
        if not images:
            return []
        if len(images) > self.max_batch:
            raise ValueError(f"{len(images)} images: at most {self.max_batch} per batch")
        offsets, total = arena_layout(images)
        self._reserve_arena(total)
        on_gpu = [i for i, image in enumerate(images) if image.data is not None]
        for index, image in enumerate(images):
            if image.rgb is not None:
                self._copy_to_device(self._arena + offsets[index], image.rgb)
        if on_gpu:
            self._decode([images[i] for i in on_gpu], [self._arena + offsets[i] for i in on_gpu])
        items = np.zeros(len(images), dtype=_ITEM)
        fits = [letterbox_fit(image.width, image.height, self.size) for image in images]
        for index, (image, fit) in enumerate(zip(images, fits, strict=True)):
            items[index] = (
                self._arena + offsets[index],
                image.width,
                image.height,
                image.width * 3,
                fit.new_width,
                fit.new_height,
                fit.left,
                fit.top,
                0,
            )
        self._launch(items, self._frames[slot])
        self._cuda(self._cudart.cudaEventRecord(self._events[slot], self._stream), "cudaEventRecord")
        return [fit.mapping for fit in fits]

    def wait(self, slot: int, stream: int) -> None:
        """Make `stream` (the engine's) wait until frame buffer `slot`'s last batch is letterboxed."""
        self._cuda(
            self._cudart.cudaStreamWaitEvent(ctypes.c_void_p(stream), self._events[slot], 0), "cudaStreamWaitEvent"
        )

    def download(self, pointer: int, shape: tuple[int, ...]) -> np.ndarray:
        """A copy of device memory as uint8 (for checks); waits for the stream."""
        out = np.empty(shape, dtype=np.uint8)
        self._memcpy(out.ctypes.data, pointer, out.nbytes, _CUDA_MEMCPY_DEVICE_TO_HOST)
        self.synchronize()
        return out

    def synchronize(self) -> None:
        self._cuda(self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    @property
    def arena(self) -> int:
        """The device address of the decoded images of the last batch (for checks)."""
        return self._arena

    def _decode(self, images: list[EncodedImage], pointers: list[int]) -> None:
        count = len(images)
        if count != self._batched:
            self._jpeg(
                self._nvjpeg.nvjpegDecodeBatchedInitialize(self._handle, self._state, count, 1, _NVJPEG_OUTPUT_RGBI),
                "nvjpegDecodeBatchedInitialize",
            )
            self._batched = count
        datas = (ctypes.c_char_p * count)(*[image.data for image in images])
        lengths = (ctypes.c_size_t * count)(*[len(image.data or b"") for image in images])
        outputs = (_ImageDesc * count)()
        for output, image, pointer in zip(outputs, images, pointers, strict=True):
            output.channel[0] = pointer
            output.pitch[0] = image.width * 3
        status = self._nvjpeg.nvjpegDecodeBatched(self._handle, self._state, datas, lengths, outputs, self._stream)
        if status != 0:
            self._batched = 0  # the state must be initialised again after a failed batch
            raise JpegBatchRejected(f"nvjpegDecodeBatched failed with status {status} on a batch of {count}")

    def _launch(self, items: np.ndarray, frames: int) -> None:
        if len(items) > self._items_count:
            if self._items:
                self._cudart.cudaFree(ctypes.c_void_p(self._items))
            self._items = self._malloc(items.nbytes)
            self._items_count = len(items)
        self._copy_to_device(self._items, items)
        block = 16
        grid = -(-self.size // block)
        args = [ctypes.c_void_p(self._items), ctypes.c_void_p(frames), ctypes.c_int(self.size), ctypes.c_int(PAD_VALUE)]
        params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(arg) for arg in args])
        self._driver_call(
            self._driver.cuLaunchKernel(
                self._function, grid, grid, len(items), block, block, 1, 0, self._stream, params, None
            ),
            "cuLaunchKernel",
        )

    def _reserve_arena(self, nbytes: int) -> None:
        if nbytes <= self._arena_bytes:
            return
        self.synchronize()  # the previous batch may still read the old arena
        if self._arena:
            self._cudart.cudaFree(ctypes.c_void_p(self._arena))
            self._arena = self._arena_bytes = 0
        self._arena = self._malloc(nbytes)
        self._arena_bytes = nbytes

    def _malloc(self, nbytes: int) -> int:
        pointer = ctypes.c_void_p()
        self._cuda(self._cudart.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(nbytes)), "cudaMalloc")
        return int(pointer.value or 0)

    def _copy_to_device(self, pointer: int, array: np.ndarray) -> None:
        """A host-to-device copy on the stream; pageable memory: it has been read when the call returns."""
        array = np.ascontiguousarray(array)
        self._memcpy(pointer, array.ctypes.data, array.nbytes, _CUDA_MEMCPY_HOST_TO_DEVICE)

    def _memcpy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        copy = self._cudart.cudaMemcpyAsync(
            ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes), kind, self._stream
        )
        self._cuda(copy, "cudaMemcpyAsync")

    @staticmethod
    def _cuda(status: int, call: str) -> None:
        check_runtime(status, call)

    @staticmethod
    def _driver_call(status: int, call: str) -> None:
        if status != 0:
            raise GpuDecodeUnavailable(f"CUDA driver call {call} failed with error {status}")

    @staticmethod
    def _jpeg(status: int, call: str) -> None:
        if status != 0:
            raise GpuDecodeUnavailable(f"nvJPEG call {call} failed with status {status}")
