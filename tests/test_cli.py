"""The `tbkd` command line end to end (small sizes): phantom → inspect round trip, the real sample,
train/distill/localize/run/predict in the smoke preset, and bad input handled per file."""
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tbkd_lib.cli import main


def tbkd(*args):
    return subprocess.run([sys.executable, "-m", "tbkd_lib", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ph"
    proc = tbkd("phantom", out, "--n-train", 40, "--n-val", 20, "--seed", 3, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 60 images" in proc.stdout
    return out


def test_inspect_json_round_trips_truth(phantoms):
    proc = tbkd("inspect", phantoms, "--split", "val", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    truth = json.loads((phantoms / "truth.json").read_text())["images"]
    assert len(rows) == 20
    n_boxes = 0
    for row in rows:
        t = truth[row["image"]]
        assert row["label"] == t["label"] and t["split"] == "val"
        assert len(row["boxes"]) == len(t["boxes"]) and row["categories"] == t["categories"]
        for got, want in zip(row["boxes"], t["boxes"]):
            assert max(abs(a - b) for a, b in zip(got, want)) <= 1.0
            n_boxes += 1
    assert n_boxes > 0


def test_inspect_table(phantoms):
    proc = tbkd("inspect", phantoms, "--split", "trainval")
    assert proc.returncode == 0
    assert "images=60" in proc.stdout and "tb" in proc.stdout


def test_inspect_real_sample(tbx11k_sample):
    sample = tbx11k_sample
    proc = tbkd("inspect", sample, "--split", "trainval", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["image"]: r for r in json.loads(proc.stdout)}
    assert len(rows) == 30 and all(r["label"] == "tb" for r in rows.values())
    assert rows["imgs/tb/tb1199.png"]["boxes"] == []
    # every box: the XML at the original resolution, scaled per axis to 512, minus one
    for xml in (sample / "annotations" / "xml").glob("*.xml"):
        root = ET.parse(xml).getroot()
        w, h = float(root.findtext("size/width")), float(root.findtext("size/height"))
        want = [[float(o.findtext(f"bndbox/{k}")) * (512 / w if k[0] == "x" else 512 / h) - 1
                 for k in ("xmin", "ymin", "xmax", "ymax")] for o in root.findall("object")]
        got = rows[f"imgs/tb/{xml.stem}.png"]["boxes"]
        assert len(got) == len(want)
        for g, e in zip(got, want):
            assert g == pytest.approx(e, abs=1e-3)


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tbkd: error:") and "nowhere" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def smoke_run(phantoms, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    for args in (("train-teacher", "--data", phantoms, "--out", run, "--preset", "smoke", "--quiet"),
                 ("distill", "--data", phantoms, "--out", run, "--preset", "smoke", "--quiet",
                  "--teacher", run / "teacher" / "best.pt", "--temperature", 2, "--alpha", 0.5)):
        proc = tbkd(*args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1].startswith(args[0].replace("train-", "").replace("distill", "student"))
    return run


def test_train_and_distill_write_run_dirs(smoke_run):
    for kind in ("teacher", "student"):
        for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt"):
            assert (smoke_run / kind / name).exists(), f"{kind}/{name}"
    cfg = json.loads((smoke_run / "student" / "config.json").read_text())
    assert cfg["temperature"] == 2 and cfg["alpha"] == 0.5


def test_localize_writes_json(smoke_run, phantoms, tmp_path):
    proc = tbkd("localize", "--data", phantoms, "--checkpoint", smoke_run / "teacher" / "best.pt", "--split", "val",
                "--out", tmp_path, "--method", "gradcam", "--tau", "0.5")
    assert proc.returncode == 0, proc.stderr
    loc = json.loads((tmp_path / "localization.json").read_text())["gradcam"]
    for key in ("miou", "miou_ci95", "hit_rate", "energy_pointing", "tau", "n_images"):
        assert key in loc
    assert loc["tau"] == 0.5 and loc["n_images"] > 0


def test_localize_with_a_preset_budget_and_set(smoke_run, phantoms, tmp_path):
    proc = tbkd("localize", "--data", phantoms, "--checkpoint", smoke_run / "teacher" / "best.pt",
                "--out", tmp_path, "--method", "gradcam", "--preset", "smoke", "--set", "n_boot=20")
    assert proc.returncode == 0, proc.stderr
    loc = json.loads((tmp_path / "localization.json").read_text())["gradcam"]
    assert 0 < loc["n_images"] <= 8  # the smoke preset's max_images (films without a box are not scored)
    bad = tbkd("localize", "--data", phantoms, "--checkpoint", smoke_run / "teacher" / "best.pt",
               "--out", tmp_path / "bad", "--set", "n_bootstrap=20")
    assert bad.returncode != 0 and "n_bootstrap" in bad.stderr
    assert not (tmp_path / "bad" / "localization.json").exists()
    # --set tau is used when --tau is not given, and the two must agree when both are
    fixed = tbkd("localize", "--data", phantoms, "--checkpoint", smoke_run / "teacher" / "best.pt",
                 "--out", tmp_path / "fixed", "--preset", "smoke", "--set", "tau=0.4")
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads((tmp_path / "fixed" / "localization.json").read_text())["gradcam"]["tau"] == 0.4
    clash = tbkd("localize", "--data", phantoms, "--checkpoint", smoke_run / "teacher" / "best.pt",
                 "--out", tmp_path / "clash", "--tau", "0.5", "--set", "tau=0.4")
    assert clash.returncode != 0 and "tau given twice" in clash.stderr
    assert not (tmp_path / "clash" / "localization.json").exists()


def test_predict_png_dicom_and_bad_file(smoke_run, phantoms, dicom_monochrome1, tmp_path):
    png = next((phantoms / "imgs" / "tb").glob("*.png"))
    dcm = dicom_monochrome1
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    out = tmp_path / "pred"
    proc = tbkd("predict", png, bad, dcm, "--checkpoint", smoke_run / "student" / "best.pt", "--out", out)
    assert proc.returncode == 2  # one file failed, the others were processed
    assert "notes.png" in proc.stderr
    result = json.loads((out / "predictions.json").read_text())
    assert [p["image"] for p in result["predictions"]] == [str(png), str(dcm)]
    assert result["errors"][0]["image"] == str(bad)
    for p in result["predictions"]:
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-3
        assert (out / f"{p['image'].rsplit('/', 1)[-1].rsplit('.', 1)[0]}_overlay.png").exists()
    dicom_pred = result["predictions"][1]
    assert (dicom_pred["width"], dicom_pred["height"]) in ((1841, 1955), (1955, 1841))
    assert (out / "predictions.csv").read_text().count("\n") == 3


def test_run_smoke_writes_report(tmp_path):
    proc = tbkd("run", "--out", tmp_path / "run", "--preset", "smoke", "--n-train", 30, "--n-val", 20, "--quiet")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    for kind in ("teacher", "student"):
        cls = report[kind]["classification"]
        for key in ("accuracy", "auc_tb", "sensitivity", "specificity"):
            assert key in cls and f"{key}_ci95" in cls
        loc = report[kind]["localization"]["gradcam"]
        for key in ("miou", "miou_ci95", "hit_rate", "energy_pointing", "tau", "n_images"):
            assert key in loc
    assert report["baseline"]["prior"]["miou"] is not None
    assert report["baseline"]["centre_box"]["method"] == "centre_box"
    assert report["baseline"]["centre_box"]["miou"] is not None
    diff = report["comparison"]["student_minus_teacher_miou"]["gradcam"]
    assert diff["n"] == report["teacher"]["localization"]["gradcam"]["n_images"]
    assert set(report["timing"]) >= {"phantoms", "teacher", "student", "total"}
    from tbkd_lib.hardware import cpu_has_native_bf16

    env = report["environment"]
    assert env["cpu_native_bf16"] == cpu_has_native_bf16() and env["cpu"]
    # the smoke preset trains with amp="auto": bf16 exactly where the CPU has native bf16
    assert env["train_precision"] == ("bfloat16" if cpu_has_native_bf16() else "float32")
    md = (tmp_path / "run" / "report.md").read_text()
    assert md.startswith("# tbkd run report") and f"Trained in {env['train_precision']}" in md
    assert report["overlays"] and (tmp_path / "run" / report["overlays"][0]).exists()


def test_score_like_run_reproduces_the_runs_own_row(tmp_path):
    """Scoring the run's own teacher again with score_like_run gives the report's row: same films, same
    calibration films, same tau, same mIoU. A checkpoint at another image size is refused."""
    from tbkd_lib.errors import ConfigError
    from tbkd_lib.pipeline import score_like_run

    run = tmp_path / "run"
    proc = tbkd("run", "--out", run, "--preset", "smoke", "--n-train", 30, "--n-val", 20, "--quiet")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run / "report.json").read_text())
    want = report["teacher"]["localization"]["gradcam"]
    got = score_like_run(run, run / "teacher" / "best.pt", methods=("gradcam",), device="cpu")["gradcam"]
    assert got["n_images"] == want["n_images"] and got["tau"] == want["tau"]
    assert got["per_image_iou"] == pytest.approx(want["per_image_iou"], abs=1e-6)
    assert got["miou"] == pytest.approx(want["miou"], abs=1e-6)
    # the run directory moved: the stored data root is gone, the run's own phantoms are used
    moved = tmp_path / "moved"
    run.rename(moved)
    again = score_like_run(moved, moved / "teacher" / "best.pt", device="cpu")["gradcam"]
    assert again["miou"] == pytest.approx(want["miou"], abs=1e-6)
    bigger = tbkd("train-teacher", "--data", moved / "data", "--out", tmp_path / "t96", "--preset", "smoke",
                  "--set", "image_size=96")
    assert bigger.returncode == 0, bigger.stderr
    with pytest.raises(ConfigError, match="96 px"):
        score_like_run(moved, tmp_path / "t96" / "teacher" / "best.pt", device="cpu")


def test_run_with_a_planted_cue_reports_shortcut_reliance(tmp_path):
    proc = tbkd("run", "--out", tmp_path / "run", "--preset", "smoke", "--n-train", 30, "--n-val", 20,
                "--shortcut", 0.9, "--quiet")
    assert proc.returncode == 0, proc.stderr
    sc = json.loads((tmp_path / "run" / "report.json").read_text())["shortcut"]
    assert sc["n_val"] == 20 and 0 < sc["n_with_cue"] < 20
    assert 0.0 < sc["cue_region_area_share"] < 0.1 and sc["cue_margin"] == 0.05
    for kind in ("teacher", "student"):
        assert 0.0 <= sc[kind]["saliency_share_in_cue"] <= 1.0 and 0.0 <= sc[kind]["cue_pointing"] <= 1.0
        assert 0.0 <= sc[kind]["accuracy_cue_disagrees"] <= 1.0
    assert "saliency share in cue region" in (tmp_path / "run" / "report.md").read_text()
