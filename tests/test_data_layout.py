"""tbkd_lib.data.layout: layout detection, bad input in both error modes, summaries."""
from __future__ import annotations

import pytest

from tbkd_lib.data import Records, detect_layout, load_records, summarize
from tbkd_lib.errors import DataError


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_detect_layout(tiny_tbx11k, tmp_path):
    assert detect_layout(tiny_tbx11k) == "tbx11k"
    kaggle = tmp_path / "kaggle"
    (kaggle / "images").mkdir(parents=True)
    (kaggle / "data.csv").write_text("fname\n")
    assert detect_layout(kaggle) == "kaggle"


def test_detect_layout_neither_names_folder_and_expectation(tiny_tbx11k):
    parent = tiny_tbx11k.parent
    with pytest.raises(DataError) as info:
        detect_layout(parent)
    message = str(info.value)
    assert str(parent) in message and "imgs/" in message and "data.csv" in message
    assert "TBX11K/" in message and f"did you mean {tiny_tbx11k}" in message
    with pytest.raises(DataError, match="data folder not found"):
        detect_layout(parent / "missing")


# (mutation, file named in the message)
BAD_INPUTS = {
    "missing image": (lambda root: (root / "imgs/sick/s0001.png").unlink(), ["TBX11K_train.txt", "s0001.png"]),
    "zero-byte png": (lambda root: (root / "imgs/health/h0001.png").write_bytes(b""), ["h0001.png", "0 bytes"]),
    "text as png": (lambda root: (root / "imgs/health/h0001.png").write_text("not an image\n"), ["h0001.png"]),
    "malformed xml": (lambda root: (root / "annotations/xml/tb0003.xml").write_text("<annotation><size>"),
                      ["tb0003.xml", "malformed XML"]),
    "box outside": (lambda root: (root / "annotations/xml/tb0003.xml").write_text(
        (root / "annotations/xml/tb0003.xml").read_text().replace("<xmax>1000<", "<xmax>2001<")),
        ["tb0003.xml", "object[0]/bndbox/xmax", "outside"]),
    "missing xml": (lambda root: (root / "annotations/xml/tb1199.xml").unlink(), ["tb1199.xml"]),
    "unknown folder": (lambda root: (root / "lists/TBX11K_train.txt").write_text(
        "health/h0001.png\nxray/a.png\ntb/tb0003.png\ntb/tb1199.png\n"),
        ["TBX11K_train.txt", "line 2", "unknown folder 'xray'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_naming_the_file(tiny_tbx11k, case):
    mutate, expected = BAD_INPUTS[case]
    mutate(tiny_tbx11k)
    with pytest.raises(DataError) as info:
        load_records(tiny_tbx11k, "train")
    for text in expected:
        assert text in str(info.value)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_skipped_and_counted(tiny_tbx11k, case):
    mutate, expected = BAD_INPUTS[case]
    mutate(tiny_tbx11k)
    records = load_records(tiny_tbx11k, "train", on_error="skip")
    assert isinstance(records, Records) and len(records) == 3 and len(records.errors.skipped) == 1
    assert expected[0] in records.errors.skipped[0][0] + records.errors.skipped[0][1]
    assert summarize(records)["skipped"] == 1


def test_several_bad_files_skipped_with_exact_counts(tiny_tbx11k):
    (tiny_tbx11k / "imgs/health/h0001.png").write_bytes(b"")
    (tiny_tbx11k / "annotations/xml/tb0003.xml").write_text("<annotation>")
    records = load_records(tiny_tbx11k, "train", on_error="skip")
    assert [r.image for r in records] == ["imgs/sick/s0001.png", "imgs/tb/tb1199.png"]
    assert [p.split("/")[-1] for p, _ in records.errors.skipped] == ["h0001.png", "tb0003.xml"]
    assert "skipped 2 file(s)" in records.errors.summary()


def test_skip_never_hides_an_empty_result(tiny_tbx11k):
    (tiny_tbx11k / "imgs/tb/tb0005.png").unlink()
    with pytest.raises(DataError, match=r"no usable record in split 'val'.*skipped 1 file"):
        load_records(tiny_tbx11k, "val", on_error="skip")


def test_truncated_png_caught_when_decoding(tiny_tbx11k):
    _truncate(tiny_tbx11k / "imgs/sick/s0001.png")
    assert len(load_records(tiny_tbx11k, "train")) == 4  # the header is intact: not decoded by default
    with pytest.raises(DataError, match="s0001.png: cannot decode image"):
        load_records(tiny_tbx11k, "train", decode=True)
    records = load_records(tiny_tbx11k, "train", decode=True, on_error="skip")
    assert len(records) == 3 and len(records.errors.skipped) == 1


def test_empty_and_missing_lists(tiny_tbx11k):
    (tiny_tbx11k / "lists/TBX11K_val.txt").write_text("")
    for mode in ("raise", "skip"):
        with pytest.raises(DataError, match="TBX11K_val.txt: empty list file"):
            load_records(tiny_tbx11k, "val", on_error=mode)
    (tiny_tbx11k / "lists/TBX11K_val.txt").unlink()
    with pytest.raises(DataError, match="TBX11K_val.txt: list file not found"):
        load_records(tiny_tbx11k, "val")
    with pytest.raises(DataError, match="unknown split 'tain'"):
        load_records(tiny_tbx11k, "tain")


def test_duplicate_line_is_refused(tiny_tbx11k):
    (tiny_tbx11k / "lists/TBX11K_val.txt").write_text("tb/tb0005.png\ntb/tb0005.png\n")
    with pytest.raises(DataError, match="line 2: 'tb/tb0005.png' is a duplicate of line 1"):
        load_records(tiny_tbx11k, "val")


def test_scheme_is_checked_up_front(tiny_tbx11k):
    with pytest.raises(DataError, match="unknown label scheme"):
        load_records(tiny_tbx11k, "train", scheme="4class")


def test_summarize(tiny_tbx11k):
    records = load_records(tiny_tbx11k, "all_train")
    summary = summarize(records, scheme="binary")
    assert summary == {
        "n_images": 8, "labels": {"healthy": 3, "sick": 1, "tb": 4},
        "per_label": {"healthy": {"images": 3, "boxes": 0}, "sick": {"images": 1, "boxes": 0},
                      "tb": {"images": 4, "boxes": 1}},
        "sources": {"extra": 4, "tbx11k": 4}, "n_boxes": 1, "boxes_per_image": {0: 7, 1: 1},
        "tb_without_boxes": 3, "categories": {"ActiveTuberculosis": 1}, "image_sizes": {"512x512": 8},
        "classes": {"non_tb": 4, "tb": 4}, "skipped": 0,
    }
