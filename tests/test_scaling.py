"""Measured memory scaling of Chen et al.'s schedules on chains of n identical blocks.

The activation peak is MemTracker's peak less what the step holds regardless of schedule:
parameters, all their gradients, the input and the loss. The blocks are narrow and the batch
wide, so activations dominate and the peak sits where the schedule puts it. ``sqrt`` must grow
like n^0.5 (log-log slope <= 0.6); ``log`` like a*log2(n) + b: a straight line in log2(n) with
R^2 >= 0.95, every doubling of n adding about the same bytes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import memplan
from measure import measured_step_peak

DEPTHS = (16, 32, 64, 128)
WIDTH, BATCH = 8, 4096  # a 128 KiB activation per block against 288 B of parameters


def chain(n: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(n) for m in (nn.Linear(WIDTH, WIDTH), nn.Tanh())])


def activation_peaks(method: str) -> dict[int, tuple[int, int, int]]:
    """Per depth: (measured, predicted, unplanned predicted) activation peak bytes."""
    peaks = {}
    for n in DEPTHS:
        model, x = chain(n), torch.randn(BATCH, WIDTH)
        plan = memplan.optimize(model, "100%", example_inputs=(x,), method=method)
        measured = measured_step_peak(plan.module, (x,))
        parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        resident = 2 * parameter_bytes + x.numel() * x.element_size()
        peaks[n] = (measured - resident, plan.predicted_peak_bytes - resident,
                    plan.baseline_peak_bytes - resident)
    return peaks


def fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a*x + b: (a, b, R^2)."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    a = sxy / sxx
    b = mean_y - a * mean_x
    residual = sum((y - (a * x + b)) ** 2 for x, y in zip(xs, ys))
    total = sum((y - mean_y) ** 2 for y in ys)
    return a, b, 1 - residual / total


@pytest.fixture(scope="module")
def sqrt_peaks():
    return activation_peaks("sqrt")


@pytest.fixture(scope="module")
def log_peaks():
    return activation_peaks("log")


def log_log_slope(peaks: dict[int, int]) -> float:
    return fit([math.log(n) for n in peaks], [math.log(p) for p in peaks.values()])[0]


def test_unplanned_chain_is_linear(sqrt_peaks):
    """The yardstick: without a plan the activations grow like n, so the fits can tell."""
    assert log_log_slope({n: p[2] for n, p in sqrt_peaks.items()}) >= 0.9


@pytest.mark.parametrize("peaks", ["sqrt_peaks", "log_peaks"])
def test_measured_matches_predicted(peaks, request):
    for n, (measured, predicted, _) in request.getfixturevalue(peaks).items():
        assert abs(measured - predicted) <= 0.03 * predicted, (n, measured, predicted)


def test_sqrt_grows_like_square_root(sqrt_peaks):
    measured = {n: p[0] for n, p in sqrt_peaks.items()}
    slope = log_log_slope(measured)
    assert slope <= 0.6, f"log-log slope {slope:.3f}; peaks {measured}"


def test_log_grows_like_log(log_peaks):
    measured = {n: p[0] for n, p in log_peaks.items()}
    a, _, r2 = fit([math.log2(n) for n in measured], list(measured.values()))
    assert a > 0 and r2 >= 0.95, f"slope {a:.0f} B per doubling, R^2 {r2:.3f}; peaks {measured}"
    peaks = list(measured.values())
    steps = [later - earlier for earlier, later in zip(peaks, peaks[1:])]
    assert all(0.5 * a <= step <= 2 * a for step in steps), f"per doubling {steps}, fit {a:.0f}"
    assert log_log_slope(measured) < 0.25  # far below sqrt's 0.5
