"""Tests of convlens.images: every image mode, broken files, huge images, folder expansion."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from convlens.errors import ImageError
from convlens.images import list_images, load_image

SIZE = (40, 36)


def _save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


def _pixel(img: Image.Image, xy: tuple[int, int] = (5, 5)) -> tuple[int, int, int]:
    value = img.getpixel(xy)
    assert isinstance(value, tuple)
    return value  # type: ignore[return-value]


def _close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 0) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


# ---- colour modes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "color", "expected", "ext"),
    [
        ("RGB", (10, 200, 30), (10, 200, 30), "png"),
        ("L", 100, (100, 100, 100), "png"),
        ("1", 1, (255, 255, 255), "png"),
        ("1", 0, (0, 0, 0), "bmp"),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0), "tif"),
        ("RGBA", (255, 0, 0, 255), (255, 0, 0), "png"),
        ("RGBA", (255, 0, 0, 0), (255, 255, 255), "png"),
        ("RGBA", (0, 0, 0, 128), (127, 127, 127), "png"),
        ("LA", (0, 0), (255, 255, 255), "png"),
        ("LA", (50, 255), (50, 50, 50), "png"),
    ],
)
def test_modes_convert_to_rgb(
    tmp_path: Path, mode: str, color: object, expected: tuple[int, int, int], ext: str
) -> None:
    path = _save(Image.new(mode, SIZE, color), tmp_path / f"img.{ext}")  # type: ignore[arg-type]
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.size == SIZE
    assert _close(_pixel(img), expected, tol=1)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = _save(Image.new("CMYK", SIZE, (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    img = load_image(path)
    assert img.mode == "RGB"
    assert _close(_pixel(img), (255, 0, 0), tol=8)


def test_palette(tmp_path: Path) -> None:
    rgb = Image.new("RGB", SIZE, (10, 200, 30))
    path = _save(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4), tmp_path / "p.png")
    with Image.open(path) as check:
        assert check.mode == "P"
    assert _pixel(load_image(path)) == (10, 200, 30)


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", SIZE, 0)
    img.putpalette([0, 0, 255, 255, 0, 0] + [0, 0, 0] * 254)
    img.paste(1, (0, 0, SIZE[0] // 2, SIZE[1]))  # left half: index 1 (red), right: index 0
    path = _save(img, tmp_path / "pt.png", transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P"
        assert "transparency" in check.info
    out = load_image(path)
    assert _pixel(out, (2, 2)) == (255, 0, 0)
    assert _pixel(out, (SIZE[0] - 2, 2)) == (255, 255, 255)  # transparent blue -> white


def test_gif_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", SIZE, 0)
    img.putpalette([0, 0, 255, 255, 0, 0] + [0, 0, 0] * 254)
    img.paste(1, (0, 0, 4, 4))
    path = _save(img, tmp_path / "t.gif", transparency=0)
    out = load_image(path)
    assert _pixel(out, (1, 1)) == (255, 0, 0)
    assert _pixel(out, (20, 20)) == (255, 255, 255)


def _gray16() -> np.ndarray:
    values = np.array([0, 257, 32768, 65535], dtype=np.uint16)
    return np.repeat(np.repeat(values, 10)[None, :], 40, axis=0)  # 40 x 40


@pytest.mark.parametrize(("dtype", "ext"), [("<u2", "png"), ("<u2", "tif"), (">u2", "tif")])
def test_sixteen_bit_scales(tmp_path: Path, dtype: str, ext: str) -> None:
    src = Image.fromarray(_gray16().astype(dtype))
    assert src.mode in ("I;16", "I;16B")
    path = _save(src, tmp_path / f"g16.{ext}")
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    out = load_image(path)
    assert [_pixel(out, (x, 5)) for x in (5, 15, 25, 35)] == [
        (0, 0, 0),
        (1, 1, 1),
        (128, 128, 128),
        (255, 255, 255),
    ]


def test_int32_mode_i(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_gray16().astype(np.int32)), tmp_path / "i32.tif")
    with Image.open(path) as check:
        assert check.mode == "I"
    out = load_image(path)
    assert [_pixel(out, (x, 5))[0] for x in (5, 25, 35)] == [0, 128, 255]


def test_int32_out_of_16bit_range_is_minmax_scaled(tmp_path: Path) -> None:
    arr = np.zeros((40, 40), dtype=np.int32)
    arr[:, 20:] = 1_000_000
    arr[:, :10] = -5
    out = load_image(_save(Image.fromarray(arr), tmp_path / "wide.tif"))
    assert _pixel(out, (5, 5))[0] == 0
    assert _pixel(out, (35, 5))[0] == 255


def test_float_mode_f(tmp_path: Path) -> None:
    arr = np.zeros((40, 40), dtype=np.float32)
    arr[:, 20:] = 1.0
    arr[:, 10:20] = 0.5
    path = _save(Image.fromarray(arr), tmp_path / "f.tif")
    with Image.open(path) as check:
        assert check.mode == "F"
    out = load_image(path)
    assert [_pixel(out, (x, 5))[0] for x in (5, 15, 35)] == [0, 128, 255]


def test_float_outside_unit_range_and_nan(tmp_path: Path) -> None:
    arr = np.full((40, 40), 300.0, dtype=np.float32)
    arr[:, :10] = -100.0
    arr[0, 0] = np.nan
    out = load_image(_save(Image.fromarray(arr), tmp_path / "f.tif"))
    assert _pixel(out, (5, 5))[0] == 0
    assert _pixel(out, (30, 5))[0] == 255


@pytest.mark.parametrize("ext", ["png", "jpg", "tif"])
def test_exif_orientation_applied(tmp_path: Path, ext: str) -> None:
    img = Image.new("RGB", (60, 40), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 30, 40))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated 90 degrees counter-clockwise; displays turned clockwise
    out = load_image(_save(img, tmp_path / f"rot.{ext}", exif=exif))
    assert out.size == (40, 60)
    assert _close(_pixel(out, (20, 5)), (255, 0, 0), tol=8)  # the left half is now on top
    assert _close(_pixel(out, (20, 55)), (0, 0, 255), tol=8)


@pytest.mark.parametrize("ext", ["gif", "tif", "webp"])
def test_multi_frame_takes_first(tmp_path: Path, ext: str) -> None:
    frames = [Image.new("RGB", SIZE, c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    path = tmp_path / f"anim.{ext}"
    frames[0].save(path, save_all=True, append_images=frames[1:], lossless=True)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 3
    assert _close(_pixel(load_image(path)), (255, 0, 0), tol=2)


# ---- size limits ----------------------------------------------------------------------------


def test_too_small(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (20, 15)), tmp_path / "tiny.png")
    with pytest.raises(ImageError, match=r"is 20x15 px; images need at least 32 px on each side"):
        load_image(path)
    assert load_image(path, min_side=10).size == (20, 15)


def test_twenty_square_too_small(tmp_path: Path) -> None:
    path = _save(Image.new("L", (20, 20)), tmp_path / "tiny.jpg")
    with pytest.raises(ImageError, match=r"tiny\.jpg' is 20x20 px"):
        load_image(path)


def test_max_side_downscales_png(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (300, 200), (9, 99, 199)), tmp_path / "wide.png")
    out = load_image(path, max_side=100)
    assert out.size == (100, 67)
    assert _pixel(out) == (9, 99, 199)


def test_max_side_downscales_palette_png(tmp_path: Path) -> None:
    img = Image.new("RGB", (300, 120), (9, 99, 199)).convert("P")
    out = load_image(_save(img, tmp_path / "p.png"), max_side=150)
    assert out.size == (150, 60)
    assert out.mode == "RGB"


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size (decoding it would fail, opening does not)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8  # chunk length(4) type(4) data(13) crc(4)
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 21]))
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize(("w", "h"), [(30_000, 30_000), (20_001, 20_000), (60_000, 60_000)])
def test_decompression_bomb_rejected_before_decoding(tmp_path: Path, w: int, h: int) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming(w, h))
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="larger than the limit"):
        load_image(path)
    assert limit == Image.MAX_IMAGE_PIXELS


def test_pixel_limit_is_configurable_and_restored(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (40, 40)), tmp_path / "a.png")
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="larger than the limit of 1000 pixels"):
        load_image(path, max_pixels=1000)
    with pytest.raises(ImageError, match="larger than the limit of 500 pixels"):
        load_image(path, max_pixels=500)
    assert limit == Image.MAX_IMAGE_PIXELS
    assert load_image(path, max_pixels=1600).size == (40, 40)


def test_huge_jpeg_decoded_at_reduced_scale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "huge.jpg"
    Image.new("L", (10_000, 10_000), 77).save(path, quality=50)  # about 1 MB on disk
    assert path.stat().st_size < 5_000_000
    drafts: list[tuple[int, int]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(
        self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None
    ) -> object:
        result = original(self, mode, size)
        drafts.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    out = load_image(path)  # 1e8 px: above Pillow's default warning limit; must not warn
    assert drafts == [(5000, 5000)]  # the decoder did the first halving
    assert out.size == (4096, 4096)
    assert out.mode == "RGB"
    assert _close(_pixel(out), (77, 77, 77), tol=2)


# ---- broken files ---------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"nope\.jpg': no such file"):
        load_image(tmp_path / "nope.jpg")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(path)


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels\n" * 20)
    with pytest.raises(ImageError, match=r"notes\.jpg': not an image"):
        load_image(path)


def _noise(size: tuple[int, int] = (200, 160)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_truncated(tmp_path: Path, ext: str) -> None:
    path = _save(_noise(), tmp_path / f"cut.{ext}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated image") as info:
        load_image(path)
    assert "\n" not in str(info.value)
    assert f"cut.{ext}" in str(info.value)


def test_corrupt_png_data(tmp_path: Path) -> None:
    path = _save(_noise(), tmp_path / "bad.png")
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    data[start : start + 64] = b"\xff" * 64  # break the zlib stream (and the chunk's CRC)
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(path)


def test_result_is_independent_of_file(tmp_path: Path) -> None:
    path = _save(_noise((64, 64)), tmp_path / "n.png")
    out = load_image(path)
    path.unlink()
    assert out.load() is not None
    assert np.asarray(out).shape == (64, 64, 3)


# ---- list_images ----------------------------------------------------------------------------


def _tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for rel in ["b.PNG", "a.jpg", "sub/c.JPEG", "sub/deeper/d.webp", ".hidden/e.jpg", ".f.jpg"]:
        (root / rel).write_bytes(b"x")
    (root / "notes.txt").write_text("no")
    (root / "sub" / "data.npy").write_bytes(b"x")


def test_list_images_recursive(tmp_path: Path) -> None:
    _tree(tmp_path)
    found = list_images([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a.jpg",
        "b.PNG",
        "sub/c.JPEG",
        "sub/deeper/d.webp",
    ]


def test_list_images_flat_explicit_and_dedup(tmp_path: Path) -> None:
    _tree(tmp_path)
    explicit = tmp_path / "notes.txt"
    found = list_images([tmp_path, explicit, tmp_path / "a.jpg", str(tmp_path)], recursive=False)
    assert found == sorted([tmp_path / "a.jpg", tmp_path / "b.PNG", explicit])


def test_list_images_single_path_and_missing(tmp_path: Path) -> None:
    _tree(tmp_path)
    assert list_images(tmp_path / "sub", recursive=False) == [tmp_path / "sub" / "c.JPEG"]
    with pytest.raises(ImageError, match="no such file or folder"):
        list_images([tmp_path / "a.jpg", tmp_path / "missing"])
    assert list_images([]) == []
