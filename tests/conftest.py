"""Fixtures shared by the tests; the helpers they use live in helpers.py."""

from __future__ import annotations

import pytest

from helpers import compared_backends, cpu_backends


@pytest.fixture(params=cpu_backends())
def backend(request) -> str:
    """Every backend that runs here, the reference included: for checks against a float64 closed form."""
    return request.param


@pytest.fixture(params=compared_backends())
def compared_backend(request) -> str:
    """Every backend but the reference: for checks that a backend agrees with the reference."""
    return request.param
