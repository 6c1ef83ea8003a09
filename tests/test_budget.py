"""Budget forms: every accepted one, to bytes; every malformed one, to a BudgetError that says
what would have been accepted."""

from __future__ import annotations

import pytest
import torch

import memplan
from memplan import BudgetError, parse_budget

REFERENCE = 1_000_000


@pytest.mark.parametrize("value, expected", [
    (1, 1),
    (8_000_000_000, 8_000_000_000),
    ("512MB", 512 * 10**6),
    ("8GB", 8 * 10**9),
    ("8 GB", 8 * 10**9),
    ("1.5TB", 1_500_000_000_000),
    ("100KB", 100_000),
    ("8GiB", 8 * 2**30),
    ("512MiB", 512 * 2**20),
    ("1KiB", 1024),
    ("8gib", 8 * 2**30),
    ("60%", 600_000),
    ("100%", REFERENCE),
    ("12.5%", 125_000),
    (0.6, 600_000),
    (1.0, REFERENCE),
])
def test_accepted_forms(value, expected):
    assert parse_budget(value, reference_bytes=REFERENCE) == expected


@pytest.mark.parametrize("value", [-1, 0, -0.5, 0.0, "abc", "60", "1.5", 1.5, True, False, None,
                                   "200%", "0%", "-5%", "5 parsecs", "", "GB", "-1GB", "0MB",
                                   [1], b"8GB"])
def test_malformed_forms_list_the_accepted_ones(value):
    with pytest.raises(BudgetError) as info:
        parse_budget(value, reference_bytes=REFERENCE)
    message = str(info.value)
    assert repr(value) in message
    for form in ("'512MB'", "'8GiB'", "'60%'", "0.6", "'auto'"):
        assert form in message


def test_budget_error_is_a_value_error():
    assert issubclass(BudgetError, ValueError)


@pytest.mark.parametrize("value", ["60%", 0.6])
def test_relative_budget_needs_a_reference(value):
    with pytest.raises(BudgetError, match="unplanned peak"):
        parse_budget(value)


def test_auto_needs_a_cuda_device():
    with pytest.raises(BudgetError, match="CUDA"):
        parse_budget("auto", reference_bytes=REFERENCE)
    assert parse_budget("auto", free_device_bytes=123_456) == 123_456


def test_auto_on_a_cpu_model_raises_budget_error():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(BudgetError, match="CUDA"):
        memplan.optimize(model, "auto", example_inputs=(torch.randn(2, 4),))


@pytest.mark.parametrize("value", [None, True, "abc", -3])
def test_optimize_rejects_malformed_budgets(value):
    model = torch.nn.Linear(4, 4)
    with pytest.raises(BudgetError, match="Accepted forms"):
        memplan.optimize(model, value, example_inputs=(torch.randn(2, 4),))


def test_fractions_of_the_unplanned_peak_scale_the_plan():
    model, x = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh()), torch.randn(32, 64)
    plan = memplan.optimize(model, "100%", example_inputs=(x,))
    assert plan.budget_bytes == plan.baseline_peak_bytes
    plan = memplan.optimize(model, 1.0, example_inputs=(x,))
    assert plan.budget_bytes == plan.baseline_peak_bytes


@pytest.mark.parametrize("peak", [1, 511, 10**6, 7 * 2**30 + 12345])
def test_cuda_headroom_and_the_least_budget_for_a_peak(peak):
    from memplan.api import budget_for_peak, headroom_bytes

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    budget = budget_for_peak(peak, cuda)
    assert budget - headroom_bytes(budget, cuda) >= peak  # the plan fits what is left
    assert budget - 1 - headroom_bytes(budget - 1, cuda) < peak  # and no smaller budget does
    assert headroom_bytes(budget, cuda) >= 0.015 * budget
    assert budget_for_peak(peak, cpu) == peak and headroom_bytes(budget, cpu) == 0
