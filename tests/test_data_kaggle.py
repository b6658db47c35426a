"""tbkd_lib.data.kaggle: the "TBX11K Simplified" CSV layout."""
from __future__ import annotations

import pytest

from tbkd_lib.data import load_records, read_kaggle_csv
from tbkd_lib.data.kaggle import parse_bbox
from tbkd_lib.errors import DataError

HEADER = "fname,image_height,image_width,source,bbox,target,tb_type,image_type"
ROWS = [
    "tb0001.png,512,512,train,\"{'xmin': 381.83, 'ymin': 126.87, 'width': 40.24, 'height': 44.57}\",tb,active_tb,tb",
    "h0001.png,512,512,train,none,no_tb,none,healthy",
    "tb0001.png,512,512,train,\"{'xmin': 100, 'ymin': 50.5, 'width': 20, 'height': 30.25}\",tb,latent_tb,tb",
    "s0001.png,512,512,val,none,no_tb,none,sick_but_no_tb",
]


@pytest.fixture
def kaggle(tmp_path, helpers):
    root = tmp_path / "tbx11k-simplified"
    for name in ("tb0001.png", "h0001.png", "s0001.png"):
        helpers.write_png(root / "images" / name)
    (root / "data.csv").write_text("\n".join([HEADER] + ROWS) + "\n")
    return root


def test_records_grouped_by_fname(kaggle):
    train = load_records(kaggle, "train")
    assert [(r.image, r.label) for r in train] == [("images/tb0001.png", "tb"), ("images/h0001.png", "healthy")]
    tb = train[0]
    assert tb.boxes == ((381.83, 126.87, 381.83 + 40.24, 126.87 + 44.57), (100.0, 50.5, 120.0, 80.75))
    assert tb.categories == ("ActiveTuberculosis", "ObsoletePulmonaryTuberculosis")
    assert (tb.width, tb.height, tb.source) == (512, 512, "tbx11k")
    assert tb.path == kaggle.resolve() / "images" / "tb0001.png"
    assert train[1].boxes == () and train[1].categories == ()
    (sick,) = load_records(kaggle, "val")
    assert sick.label == "sick" and sick.boxes == ()
    assert [r.image for r in load_records(kaggle, "trainval")] == [
        "images/tb0001.png", "images/h0001.png", "images/s0001.png"]


def test_parse_bbox():
    assert parse_bbox("none") is None
    assert parse_bbox("{'xmin': 1, 'ymin': 2, 'width': 3, 'height': 4}") == (1.0, 2.0, 4.0, 6.0)
    for bad in ("{'xmin': 1", "[1, 2, 3, 4]", "{'xmin': 1, 'ymin': 2, 'width': 0, 'height': 4}",
                "{'xmin': 'a', 'ymin': 2, 'width': 3, 'height': 4}", "__import__('os')"):
        with pytest.raises(DataError, match="data.csv: line 7, field 'bbox'"):
            parse_bbox(bad, "data.csv", 7)


def test_malformed_bbox_names_csv_line_and_field(kaggle):
    rows = ROWS[:3] + ["s0001.png,512,512,val,\"{'xmin': 1, 'ymin':\",no_tb,none,sick_but_no_tb"]
    (kaggle / "data.csv").write_text("\n".join([HEADER] + rows) + "\n")
    with pytest.raises(DataError) as info:
        load_records(kaggle, "trainval")
    message = str(info.value)
    assert "data.csv" in message and "line 5" in message and "'bbox'" in message
    records = load_records(kaggle, "trainval", on_error="skip")
    assert [r.image for r in records] == ["images/tb0001.png", "images/h0001.png"]
    assert len(records.errors.skipped) == 1 and "line 5" in records.errors.skipped[0][1]


@pytest.mark.parametrize("row, expected", [
    ("h0001.png,512,512,test,none,no_tb,none,healthy", "field 'source'"),
    ("h0001.png,512,512,train,none,no_tb,none,ill", "field 'image_type'"),
    ("h0001.png,512,512,train,none,tb,none,healthy", "field 'target'"),
    ("h0001.png,512,x,train,none,no_tb,none,healthy", "field 'image_width'"),
    ("h0001.png,512,512,train,\"{'xmin': 1, 'ymin': 2, 'width': 3, 'height': 4}\",no_tb,none,healthy",
     "a box on a 'healthy' image"),
    ("h0001.png,512,512,train", "field 'bbox': missing: the row has fewer than 8 fields"),
])
def test_bad_rows(kaggle, row, expected):
    (kaggle / "data.csv").write_text("\n".join([HEADER, row]) + "\n")
    with pytest.raises(DataError, match=f"data.csv: line 2, .*{expected}"):
        load_records(kaggle, "train")


def test_short_row_of_a_known_image_is_not_ignored(kaggle):
    (kaggle / "data.csv").write_text("\n".join([HEADER, ROWS[1], "h0001.png,512"]) + "\n")
    with pytest.raises(DataError, match="line 3, field 'image_width': missing"):
        load_records(kaggle, "train")


def test_bad_tb_type_and_inconsistent_rows(kaggle):
    rows = [ROWS[0], ROWS[2].replace("latent_tb", "none")]
    (kaggle / "data.csv").write_text("\n".join([HEADER] + rows) + "\n")
    with pytest.raises(DataError, match="line 3, field 'tb_type'"):
        load_records(kaggle, "train")
    rows = [ROWS[0], ROWS[2].replace(",train,", ",val,")]
    (kaggle / "data.csv").write_text("\n".join([HEADER] + rows) + "\n")
    with pytest.raises(DataError, match="line 3, field 'source': 'val' differs from line 2"):
        load_records(kaggle, "train")


def test_bad_header_missing_image_and_split(kaggle):
    csv = kaggle / "data.csv"
    (kaggle / "images" / "h0001.png").unlink()
    with pytest.raises(DataError, match=r"data.csv: line 3: listed image .*h0001.png does not exist"):
        load_records(kaggle, "train")
    with pytest.raises(DataError, match="unknown split 'all_train' for the Kaggle layout"):
        load_records(kaggle, "all_train")
    csv.write_text("fname,bbox\nh0001.png,none\n")
    with pytest.raises(DataError, match=r"data.csv: line 1: header fname,bbox lacks \['image_height'"):
        read_kaggle_csv(csv)
