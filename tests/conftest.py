"""Test setup: without CUDA, Triton kernels run in Triton's CPU interpreter (set before anything imports
triton)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# The native backend reads CPU tensors only: tests whose data live on DEVICE skip it on a CUDA machine.
NATIVE = pytest.param("native", marks=pytest.mark.skipif(DEVICE != "cpu", reason="native reads CPU tensors"))


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch):
    """A :class:`helpers.Poison`: ``poison(fn, *args)`` runs one call with poisoned ``torch.empty``."""
    from helpers import Poison

    return Poison(monkeypatch)


@pytest.fixture
def poisoned_empty(poison) -> None:
    """``torch.empty`` poisoned for the whole test (:class:`helpers.Poison`)."""
    poison.install()
