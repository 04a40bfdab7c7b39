"""Metrics equal scikit-learn/scipy on fixed predictions, and known hand-computed values."""

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from squat_cli.metrics import task_metrics
from squat_cli.tasks import get_task

rng = np.random.RandomState(0)
Y = rng.randint(0, 2, 200)
P = np.where(rng.rand(200) < 0.8, Y, 1 - Y)


def test_cola_matthews():
    m = task_metrics(get_task("cola"), {"dev": (P, Y)})
    assert m == {"matthews_correlation": matthews_corrcoef(Y, P)}
    # hand computation: tp=2 tn=1 fp=1 fn=0 -> (2*1-1*0)/sqrt(3*2*2*1)
    hand = task_metrics(get_task("cola"), {"dev": (np.array([1, 1, 1, 0]), np.array([1, 1, 0, 0]))})
    assert hand["matthews_correlation"] == pytest.approx(2 / np.sqrt(12))


@pytest.mark.parametrize("name", ["mrpc", "qqp"])
def test_accuracy_f1(name):
    m = task_metrics(get_task(name), {"dev": (P, Y)})
    assert m["accuracy"] == accuracy_score(Y, P)
    assert m["f1"] == f1_score(Y, P)
    hand = task_metrics(get_task(name), {"dev": (np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1]))})
    assert hand == {"accuracy": 0.75, "f1": pytest.approx(0.8)}


def test_stsb():
    y = rng.rand(100) * 5
    p = y + rng.randn(100)
    m = task_metrics(get_task("stsb"), {"dev": (p, y)})
    assert m["pearson"] == pearsonr(p, y)[0]
    assert m["spearmanr"] == spearmanr(p, y)[0]


def test_mnli_matched_and_mismatched():
    y2 = np.array([0, 1, 2, 2])
    m = task_metrics(get_task("mnli"), {"dev_matched": (P % 3, Y % 3), "dev_mismatched": (np.array([0, 1, 1, 2]), y2)})
    assert m == {"accuracy": accuracy_score(Y % 3, P % 3), "accuracy_mm": 0.75}


@pytest.mark.parametrize("name", ["sst2", "qnli", "rte", "wnli"])
def test_accuracy_only(name):
    assert task_metrics(get_task(name), {"dev": (P, Y)}) == {"accuracy": accuracy_score(Y, P)}
