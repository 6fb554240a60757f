"""Reading image files into 8-bit RGB PIL images, with clear errors for bad files.

:func:`load_image` accepts every mode Pillow opens (bilevel, grayscale, palette, alpha, CMYK,
16-bit and 32-bit integer, 32-bit float), applies the EXIF orientation, takes the first frame of
animations and multi-page files, and shrinks huge images while decoding (JPEG) or right after.
:func:`list_images` expands folders given on the command line into image files.
"""

from __future__ import annotations

import os
import stat
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from convlens.errors import ImageError
from convlens.userfiles import describe_file_kind

__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "list_images", "load_image"]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
"""File extensions (lower case) that :func:`list_images` picks up from folders."""

MAX_PIXELS: int = 20_000 * 20_000
"""Largest image (width x height, before any downscaling) :func:`load_image` accepts."""

# Pillow's decompression-bomb limit is a module global that Image.open and some plugins' load()
# read. load_image raises it for the duration of one open+load only, under this lock, and puts
# back whatever value it found (see _pixel_limit).
_PIXEL_LIMIT_LOCK = threading.Lock()

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError)

# EXIF orientation -> transpose that undoes it (the table of ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Modes resized before conversion (cheaper). Not I and F: resampling overshoot would change how
# their value range is read by _gray_to_uint8.
_RESAMPLABLE_MODES = frozenset({"L", "RGB", "RGBA", "LA", "CMYK"})


def load_image(
    path: str | Path,
    *,
    max_side: int = 4096,
    min_side: int = 32,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Read an image file as an 8-bit RGB image, validated and bounded in size.

    Conversions: bilevel, grayscale, palette and CMYK images are converted by Pillow; images with
    transparency (RGBA, LA, PA, palette or grayscale with a transparent colour) are composited
    over white; 16-bit images map 0..65535 linearly to 0..255 (``round(v / 257)``); 32-bit
    integer images (mode ``I``) are treated as 16-bit when their values lie in 0..65535 and
    min-max scaled otherwise; float images (mode ``F``) are scaled by 255 when their values lie in
    [0, 1] and min-max scaled otherwise (NaN becomes 0). The EXIF orientation is applied and only
    the first frame of a multi-frame file (GIF, TIFF, WebP) is read.

    Images larger than ``max_side`` on their longer side are shrunk (aspect ratio kept): JPEGs
    are decoded at 1/2, 1/4 or 1/8 scale by the decoder itself (``Image.draft``), so a
    10000 x 10000 photo never exists in memory at full size; other formats are decoded fully and
    then downscaled with ``Image.thumbnail``.

    Args:
        path: the image file.
        max_side: longest side of the returned image, in pixels.
        min_side: shortest side an image must have, in pixels (checked on the file's own size).
        max_pixels: largest width x height accepted, checked from the header before decoding;
            it replaces Pillow's decompression-bomb limit for this call only.

    Returns:
        An RGB image, loaded (the file is closed), at most ``max_side`` on each side.

    Raises:
        ImageError: the path is missing, a directory or another non-regular file (a FIFO, a
            device), the file is empty, not an image, corrupt or truncated, smaller than
            ``min_side`` or larger than ``max_pixels``.
    """
    if max_side < 1 or min_side < 1:
        raise ValueError(f"max_side and min_side must be positive, got {max_side} and {min_side}")
    p = Path(path)
    if not p.exists():
        raise ImageError(f"cannot read image '{p}': no such file")
    if p.is_dir():
        raise ImageError(f"cannot read image '{p}': it is a directory, not an image file")
    try:
        info = p.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the decoder, a device never end
            raise ImageError(
                f"cannot read image '{p}': it is {describe_file_kind(info.st_mode)}, "
                "not an image file"
            )
        if info.st_size == 0:
            raise ImageError(f"cannot read image '{p}': the file is empty")
    except OSError as exc:
        raise ImageError(f"cannot read image '{p}': {_reason(exc)}") from exc

    try:
        with _pixel_limit(max_pixels), Image.open(p) as img:
            _check_size(p, img.size, min_side=min_side, max_pixels=max_pixels)
            if img.format in ("JPEG", "MPO"):
                img.draft("RGB", (max_side, max_side))
            img.load()  # full decode here, so that corrupt data fails now
            orientation = _orientation(img)  # after load: PNG keeps EXIF after the pixels
            small = _shrink(img, max_side)
            try:
                rgb = _to_rgb(small)
            except ValueError as exc:
                raise ImageError(
                    f"cannot read image '{p}': unsupported colour mode {img.mode!r}"
                ) from exc
            if rgb is img:  # closing the file frees the pixels of the opened image
                rgb = img.copy()
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(f"cannot read image '{p}': not an image (format not recognised)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"cannot read image '{p}': larger than the limit of {max_pixels} pixels"
        ) from exc
    except PermissionError as exc:
        raise ImageError(f"cannot read image '{p}': permission denied") from exc
    except MemoryError as exc:
        raise ImageError(f"cannot read image '{p}': out of memory while decoding") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(
            f"cannot read image '{p}': corrupt or truncated image ({_reason(exc)})"
        ) from exc

    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    if method is not None:
        rgb = rgb.transpose(method)
    return rgb


def list_images(paths: Iterable[str | Path] | str | Path, recursive: bool = True) -> list[Path]:
    """Expand files and folders into a sorted, deduplicated list of image files.

    Files given explicitly are kept whatever their extension (:func:`load_image` reports the
    ones that are not images). Folders contribute the files whose extension, in any case, is in
    :data:`IMAGE_EXTENSIONS`; hidden files and folders (names starting with ``.``) are skipped and
    symbolic links to folders are not followed. Two spellings of the same file count once (the
    first one given is kept).

    Args:
        paths: files and folders (a single path is accepted too).
        recursive: also search subfolders of the given folders.

    Returns:
        The image files, sorted; empty when the folders hold no images.

    Raises:
        ImageError: a path does not exist or is empty.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: dict[Path, Path] = {}
    for raw in paths:
        if not str(raw).strip():  # Path("") is the current folder
            raise ImageError("an empty image path was given (an unset shell variable?)")
        p = Path(raw).expanduser()
        if p.is_dir():
            candidates: Iterable[Path] = _walk_images(p, recursive=recursive)
        elif p.exists():
            candidates = [p]
        else:
            raise ImageError(f"no such file or folder: '{p}'")
        for c in candidates:
            found.setdefault(_identity(c), c)
    return sorted(found.values())


def _walk_images(folder: Path, *, recursive: bool) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = [] if not recursive else [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(root) / name


def _identity(p: Path) -> Path:
    try:
        return p.resolve()
    except (OSError, RuntimeError):
        return p.absolute()


@contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Make Pillow's decompression-bomb check use ``max_pixels`` for the enclosed block.

    Pillow warns above ``Image.MAX_IMAGE_PIXELS`` and raises above twice that. Here the limit is
    set to ``max_pixels`` and the warning is turned into an error, so images up to ``max_pixels``
    load silently and larger ones fail; the previous limit and warning filters are restored.
    """
    with _PIXEL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _check_size(path: Path, size: tuple[int, int], *, min_side: int, max_pixels: int) -> None:
    w, h = size
    if min(w, h) < min_side:
        raise ImageError(
            f"image '{path}' is {w}x{h} px; images need at least {min_side} px on each side"
        )
    if w * h > max_pixels:
        raise ImageError(
            f"image '{path}' is {w}x{h} px, larger than the limit of {max_pixels} pixels"
        )


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1..8) of an opened image; 1 when absent or unreadable."""
    try:
        value = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not make a readable image unreadable
        return 1
    return value if isinstance(value, int) else 1


def _shrink(img: Image.Image, max_side: int) -> Image.Image:
    """Downscale to ``max_side`` before colour conversion where that is exact and cheaper.

    Only modes that Pillow resamples with a real filter and without a transparent colour key are
    shrunk here; the others are shrunk after conversion to RGB. Returns ``img`` itself when
    nothing is done, a new image otherwise.
    """
    w, h = img.size
    if max(w, h) <= max_side or img.mode not in _RESAMPLABLE_MODES or "transparency" in img.info:
        return img
    scale = max_side / max(w, h)
    size = (min(max_side, max(1, round(w * scale))), min(max_side, max(1, round(h * scale))))
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded image of any mode to 8-bit RGB (see :func:`load_image`).

    Returns ``img`` itself when it already is plain RGB, a new image otherwise.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_gray_to_uint8(np.asarray(img), mode)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _gray_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16-bit, 32-bit integer or float single-channel array to 0..255."""
    if mode in _SIXTEEN_BIT_MODES:
        return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if mode == "I":
        lo, hi = int(a.min()), int(a.max())
        if lo >= 0 and hi <= 65535:
            return ((a.astype(np.int64) + 128) // 257).astype(np.uint8)
        return _minmax(a.astype(np.float64))
    f = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if f.size and f.min() >= 0.0 and f.max() <= 1.0:
        return np.rint(f * 255.0).astype(np.uint8)
    return _minmax(f)


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _reason(exc: BaseException) -> str:
    """Exception text cut to its first line, for one-line messages."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
