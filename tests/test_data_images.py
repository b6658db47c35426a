"""tbkd_lib.data.images: one float image from PNG/JPEG (8/16-bit, gray/RGB) or DICOM; precise errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tbkd_lib.data import image_size, read_image, read_image_uint8_resized
from tbkd_lib.errors import DataError

GRAY = np.array([[0, 51], [204, 255]], dtype=np.uint8)


def _save(path, array, fmt=None):
    Image.fromarray(array).save(path, format=fmt)
    return path


def test_8bit_gray_and_rgb_gray(tmp_path):
    expected = np.array([[0.0, 0.2], [0.8, 1.0]], dtype=np.float32)
    gray = read_image(_save(tmp_path / "g.png", GRAY))
    rgb = read_image(_save(tmp_path / "c.png", np.stack([GRAY] * 3, -1)))
    assert gray.dtype == np.float32 and gray.shape == (2, 2)
    np.testing.assert_array_equal(gray, expected)
    np.testing.assert_array_equal(rgb, expected)


def test_true_colour_is_luma(tmp_path):
    rgb = np.zeros((1, 3, 3), dtype=np.uint8)
    rgb[0, 0], rgb[0, 1], rgb[0, 2] = (255, 0, 0), (0, 255, 0), (100, 50, 200)
    image = read_image(_save(tmp_path / "c.png", rgb))
    np.testing.assert_allclose(image[0], [0.299, 0.587, (0.299 * 100 + 0.587 * 50 + 0.114 * 200) / 255], rtol=1e-6)


def test_16bit_png(tmp_path):
    full = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    image = read_image(_save(tmp_path / "w.png", full))
    np.testing.assert_allclose(image, full / 65535.0, rtol=1e-6)
    twelve = np.array([[0, 4095], [2048, 100]], dtype=np.uint16)  # 12-bit data in a 16-bit PNG
    np.testing.assert_allclose(read_image(_save(tmp_path / "t.png", twelve)), twelve / 4095.0, rtol=1e-6)


def test_jpeg_named_png_is_fine(tmp_path):
    path = tmp_path / "really_a_jpeg.png"
    _save(path, np.full((8, 8), 128, dtype=np.uint8), fmt="JPEG")
    assert read_image(path).shape == (8, 8)
    assert abs(float(read_image(path).mean()) - 128 / 255) < 0.01


@pytest.mark.parametrize("content, expected", [
    (None, "file not found"), (b"", "empty file (0 bytes)"), (b"just some text\n", "cannot decode image"),
    ("TRUNCATED", "cannot decode image"),
])
def test_bad_files_raise_dataerror_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "bad.png"
    if content == "TRUNCATED":
        _save(path, np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_image(path)
    assert str(path) in str(info.value) and expected in str(info.value)
    assert "expected a PNG, JPEG or DICOM image" in str(info.value)


def test_image_size_reads_the_header_only(tmp_path):
    path = _save(tmp_path / "r.png", np.random.default_rng(0).integers(0, 255, (30, 40), dtype=np.uint8))
    assert image_size(path) == (40, 30)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert image_size(path) == (40, 30)  # header intact
    path.write_text("hello")
    with pytest.raises(DataError, match="cannot read image header"):
        image_size(path)


def test_resized_uint8(tmp_path):
    array = np.zeros((64, 32), dtype=np.uint8)
    array[:, 16:] = 255
    out = read_image_uint8_resized(_save(tmp_path / "s.png", array), 16)
    assert out.dtype == np.uint8 and out.shape == (16, 16)
    assert out[:, :7].max() == 0 and out[:, 9:].min() == 255  # left half black, right half white
    same = read_image_uint8_resized(_save(tmp_path / "x.png", GRAY), 2)
    np.testing.assert_array_equal(same, GRAY)


def test_dicom_routed_by_magic_and_same_kind_as_png(tmp_path, make_dicom):
    pixels = np.array([[0, 1000], [2000, 4000]])
    a = read_image(make_dicom(tmp_path / "scan.dcm", pixels))
    b = read_image(make_dicom(tmp_path / "scan.bin", pixels))  # no DICOM extension: DICM magic at 128
    png = read_image(_save(tmp_path / "p.png", GRAY))
    assert a.dtype == b.dtype == png.dtype == np.float32 and a.shape == png.shape == (2, 2)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, [[0.0, 0.25], [0.5, 1.0]])

