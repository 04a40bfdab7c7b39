"""The SQuAT paper's published numbers (Tables 1-4), shipped as data in ``paper_numbers.csv``.

Main and auxiliary metrics are in percent, as printed in the paper; sharpness is raw.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Optional

import pandas as pd

from squat_cli.quant.methods import METHODS_BY_NAME

PAPER_METHOD = {m.name: m.paper_label for m in METHODS_BY_NAME.values() if m.paper_label}
"""Our method names -> the paper's row labels (from the method table)."""


@lru_cache(maxsize=1)
def paper_numbers() -> pd.DataFrame:
    with resources.files("squat_cli.report").joinpath("paper_numbers.csv").open("r", encoding="utf-8") as f:
        return pd.read_csv(f)


def paper_value(table: str, method: str, wbits: int, task: str, metric: str) -> Optional[float]:
    """The paper's mean for one cell, or None where it printed none (or has no such row)."""
    label = PAPER_METHOD.get(method)
    if label is None:
        return None
    df = paper_numbers()
    hit = df[(df.table == table) & (df.method == label) & (df.wbits == wbits) & (df.task == task)
             & (df.metric == metric)]
    if hit.empty or pd.isna(hit.iloc[0]["mean"]):
        return None
    return float(hit.iloc[0]["mean"])
