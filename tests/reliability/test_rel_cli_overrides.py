"""``--set FIELD=VALUE`` for a field that also has its own flag (``--set epochs=4``) used to crash the CLI
with ``TypeError: got multiple values for keyword argument 'epochs'`` (every TINY run in this folder
relies on it). Both ways at once must agree."""
from __future__ import annotations


def test_set_and_flag_for_the_same_field(rel, phantoms, tmp_path, capsys):
    rc, _, err = rel.main(capsys, "train-teacher", "--data", phantoms, "--out", tmp_path / "R", "--preset", "smoke",
                          "--epochs", "3", "--set", "epochs=4", "--quiet")
    assert rc == 2 and err == "tbkd: error: epochs given twice with different values (3 and --set epochs=4)\n"
    assert not (tmp_path / "R").exists()
    rc, _, err = rel.main(capsys, "distill", "--data", phantoms, "--out", tmp_path / "S", "--teacher",
                          tmp_path / "missing.pt", "--preset", "smoke", "--alpha", "0.5", "--set", "alpha=0.9")
    assert rc == 2 and "alpha given twice" in err, err
