"""tbkd_lib.metrics: TBX11K classification metrics vs scikit-learn on fixed arrays."""
import math

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, confusion_matrix, precision_score, recall_score,
                             roc_auc_score)

from tbkd_lib.errors import ConfigError
from tbkd_lib.metrics import CI_METRICS, _auc, classification_metrics, roc_curve_tb

LABELS = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 1])
PROBS = np.array([
    [0.7, 0.2, 0.1], [0.3, 0.5, 0.2], [0.6, 0.1, 0.3], [0.2, 0.6, 0.2],
    [0.1, 0.3, 0.6], [0.4, 0.4, 0.2], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3],
    [0.3, 0.2, 0.5], [0.05, 0.05, 0.9], [0.5, 0.3, 0.2], [0.2, 0.7, 0.1],
])


def test_matches_sklearn_on_fixed_arrays():
    m = classification_metrics(LABELS, PROBS, n_boot=0)
    pred = PROBS.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(LABELS, pred))
    assert m["auc_tb"] == pytest.approx(roc_auc_score(LABELS == 2, PROBS[:, 2]))
    assert m["sensitivity"] == pytest.approx(recall_score(LABELS == 2, pred == 2))
    assert m["specificity"] == pytest.approx(recall_score(LABELS != 2, pred != 2))
    assert m["precision_macro"] == pytest.approx(precision_score(LABELS, pred, average="macro", zero_division=0))
    assert m["recall_macro"] == pytest.approx(recall_score(LABELS, pred, average="macro", zero_division=0))
    assert m["confusion_matrix"] == confusion_matrix(LABELS, pred, labels=[0, 1, 2]).tolist()
    assert m["n"] == 12
    assert not any(k.endswith("_ci95") for k in m)


def test_hand_counted_values():
    # pred = [0,1,0,1,2,0,2,1,2,2,0,1]: 8 of 12 right; TB (2) recall 3/4; non-TB predicted non-TB 7/8
    m = classification_metrics(LABELS, PROBS, n_boot=0)
    assert m["accuracy"] == pytest.approx(8 / 12)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(7 / 8)


def test_specificity_counts_sick_predicted_healthy_as_correct():
    labels = np.array([1, 1, 2])
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    m = classification_metrics(labels, probs, n_boot=0)
    assert m["specificity"] == 1.0 and m["accuracy"] == pytest.approx(2 / 3)


def test_precision_with_a_never_predicted_class_matches_sklearn():
    labels = np.array([0, 1, 2, 2, 1, 0])
    probs = np.eye(3)[[0, 0, 2, 2, 0, 0]] * 0.8 + 0.1  # class 1 never predicted
    pred = probs.argmax(1)
    m = classification_metrics(labels, probs, n_boot=0)
    assert m["precision_macro"] == pytest.approx(precision_score(labels, pred, average="macro", zero_division=0))
    assert m["recall_macro"] == pytest.approx(recall_score(labels, pred, average="macro", zero_division=0))


def test_binary_scheme():
    labels = np.array([0, 0, 1, 1, 1])
    probs = np.array([[0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    m = classification_metrics(labels, probs, scheme="binary", n_boot=0)
    assert m["auc_tb"] == pytest.approx(roc_auc_score(labels, probs[:, 1]))
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(1 / 2)


def test_undefined_values_are_none_not_nan():
    labels = np.array([0, 1, 1])  # no TB image
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]])
    m = classification_metrics(labels, probs, n_boot=20)
    assert m["auc_tb"] is None and m["sensitivity"] is None and m["auc_tb_ci95"] is None
    assert m["specificity"] == pytest.approx(2 / 3)
    for v in m.values():
        assert not (isinstance(v, float) and math.isnan(v))


def test_bootstrap_ci_deterministic_and_seed_dependent():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 80)
    probs = rng.dirichlet([1, 1, 1], 80)
    a = classification_metrics(labels, probs, n_boot=200, seed=0)
    b = classification_metrics(labels, probs, n_boot=200, seed=0)
    c = classification_metrics(labels, probs, n_boot=200, seed=1)
    for name in CI_METRICS:
        lo, hi = a[f"{name}_ci95"]
        assert lo <= a[name] + 1e-12 and a[name] - 1e-12 <= hi
        assert a[f"{name}_ci95"] == b[f"{name}_ci95"]
    assert any(a[f"{n}_ci95"] != c[f"{n}_ci95"] for n in CI_METRICS)


def test_fast_auc_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 3, 40)
        p_tb = np.round(rng.random(40), 1)  # many ties
        if (labels == 2).all() or (labels != 2).all():
            continue
        assert _auc(labels, None, p_tb, 2) == pytest.approx(roc_auc_score(labels == 2, p_tb), abs=1e-12)


def test_roc_curve_tb():
    roc = roc_curve_tb(LABELS, PROBS)
    assert roc["auc"] == pytest.approx(roc_auc_score(LABELS == 2, PROBS[:, 2]))
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0
    assert all(math.isfinite(t) for t in roc["thresholds"])
    assert roc_curve_tb(np.array([0, 1]), PROBS[:2])["auc"] is None


def test_bad_shapes_raise():
    with pytest.raises(ConfigError):
        classification_metrics(LABELS, PROBS[:, :2])
    with pytest.raises(ConfigError):
        classification_metrics(LABELS + 1, PROBS)
