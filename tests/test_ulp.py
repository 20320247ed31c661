"""The tests' ulp-distance helper (tests/conftest.py), checked against nextafter walks."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_within_ulps, spacing, ulp_distance


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_counts_representable_values_between(dtype):
    start = torch.tensor([1.0, -3.5, 0.0, 1e-3, -1e-3, 60000.0 if dtype == torch.float16 else 1e30], dtype=dtype)
    walked = start.clone()
    for steps in range(1, 4):
        walked = walked.nextafter(torch.full_like(walked, float("inf")))
        assert ulp_distance(walked, start).tolist() == [steps] * start.numel()
        assert ulp_distance(start, walked).tolist() == [steps] * start.numel()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_zero_signs_nan_and_infinity(dtype):
    tiny = torch.finfo(dtype).smallest_normal
    left = torch.tensor([0.0, -0.0, float("nan"), float("nan"), 1.0, float("inf"), -tiny], dtype=dtype)
    right = torch.tensor([-0.0, 0.0, float("nan"), 1.0, float("nan"), float("inf"), tiny], dtype=dtype)
    distance = ulp_distance(left, right).tolist()
    assert distance[:3] == [0, 0, 0] and distance[3:5] == [float("inf")] * 2 and distance[5] == 0
    assert distance[6] == 2 * ulp_distance(torch.tensor([tiny], dtype=dtype), torch.zeros(1, dtype=dtype)).item()


def test_far_apart_float64_does_not_overflow():
    huge = torch.tensor([torch.finfo(torch.float64).max], dtype=torch.float64)
    assert ulp_distance(huge, -huge).item() > 2.0**63


def test_assert_names_the_worst_element():
    expected = torch.ones(8)
    actual = expected.clone()
    actual[5] = actual[5].nextafter(torch.tensor(2.0)).nextafter(torch.tensor(2.0))
    assert_within_ulps(actual, expected, 2)
    with pytest.raises(AssertionError, match="1 of 8 elements are more than 1 ulp apart; first worst at flat index 5"):
        assert_within_ulps(actual, expected, 1, "demo")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_spacing_is_the_gap_to_the_next_value(dtype):
    values = torch.tensor([1.0, 0.75, 3.0, 1e-3, -2.5], dtype=dtype)
    gaps = (values.abs().nextafter(torch.full_like(values, float("inf"))) - values.abs()).double()
    assert torch.equal(spacing(values.double(), dtype), gaps)


def test_scale_admits_ulps_of_the_operands_not_of_the_result():
    expected = torch.tensor([0.003])
    actual = expected + 2 * spacing(torch.tensor([0.003]), torch.float32).float()  # 2 ulp of the result
    with pytest.raises(AssertionError):
        assert_within_ulps(actual, expected, 1)
    assert_within_ulps(actual, expected, 1, scale=torch.tensor([1.0]))  # far below one ulp at 1.0
    with pytest.raises(AssertionError):
        assert_within_ulps(torch.tensor([float("inf")]), torch.tensor([3e38]), 1, scale=3e38)
