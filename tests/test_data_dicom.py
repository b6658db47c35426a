"""tbkd_lib.data.dicom: Modality LUT, windowing, MONOCHROME1 inversion, missing pixel data."""
from __future__ import annotations

import numpy as np
import pytest

from tbkd_lib.data import image_size, read_dicom
from tbkd_lib.errors import DataError

PIXELS = np.array([[0, 100], [200, 400]])


def test_monochrome2_min_max(tmp_path, make_dicom):
    out = read_dicom(make_dicom(tmp_path / "a.dcm", PIXELS))
    assert out.dtype == np.float32 and out.shape == (2, 2)
    np.testing.assert_allclose(out, [[0.0, 0.25], [0.5, 1.0]])


def test_rescale_then_window(tmp_path, make_dicom):
    # slope 2, intercept -100: values -100, 100, 300, 700. LINEAR window centre 300.5, width 401 covers
    # 100 < v <= 500 (PS3.3 C.11.2.1.2.1): -100 and 100 -> bottom, 300 -> middle, 700 -> top.
    path = make_dicom(tmp_path / "w.dcm", PIXELS, RescaleSlope=2, RescaleIntercept=-100,
                      WindowCenter=300.5, WindowWidth=401)
    np.testing.assert_allclose(read_dicom(path), [[0.0, 0.0], [0.5, 1.0]], atol=1e-6)


def test_monochrome1_is_inverted(tmp_path, make_dicom):
    out = read_dicom(make_dicom(tmp_path / "m1.dcm", PIXELS, photometric="MONOCHROME1"))
    np.testing.assert_allclose(out, [[1.0, 0.75], [0.5, 0.0]])


def test_no_pixel_data(tmp_path, make_dicom):
    path = make_dicom(tmp_path / "empty.dcm", PIXELS, with_pixels=False)
    with pytest.raises(DataError, match="empty.dcm: no pixel data element"):
        read_dicom(path)


def test_not_a_dicom(tmp_path):
    path = tmp_path / "fake.dcm"
    path.write_text("hello")
    with pytest.raises(DataError, match="fake.dcm: not a readable DICOM file"):
        read_dicom(path)
    with pytest.raises(DataError, match="missing.dcm: file not found"):
        read_dicom(tmp_path / "missing.dcm")


@pytest.mark.real_data
def test_real_monochrome1_chest(dicom_monochrome1):
    image = read_dicom(dicom_monochrome1)
    assert image.dtype == np.float32 and image.shape == (1955, 1841)  # rows x columns
    assert image_size(dicom_monochrome1) == (1841, 1955)  # (width, height)
    assert image.min() == 0.0 and image.max() == 1.0
    h, w = image.shape

    def patch(r0, r1, c0, c1):
        return float(image[int(r0 * h): int(r1 * h), int(c0 * w): int(c1 * w)].mean())

    right_lung, left_lung = patch(0.25, 0.45, 0.20, 0.33), patch(0.25, 0.45, 0.67, 0.80)
    mediastinum = patch(0.30, 0.60, 0.45, 0.55)
    # Inverted like a PNG film: lungs dark (about 0.51), mediastinum/spine bright (about 0.89).
    assert right_lung < mediastinum - 0.2 and left_lung < mediastinum - 0.2
