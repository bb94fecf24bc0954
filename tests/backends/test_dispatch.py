"""Backend choice against the installed Triton: the kernels need Triton >= 3.4 (setup.py's floor)."""

import warnings

import pytest
import torch

from fastgradstats import dispatch

triton = pytest.importorskip("triton")
CUDA = torch.device("cuda", 0)  # resolve_backend only reads the device type: no GPU needed


@pytest.fixture
def installed_triton(monkeypatch):
    """Set the installed Triton's version string; the cached verdict and the warn-once flag start fresh."""
    monkeypatch.delenv("FASTGRADSTATS_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_warned_old_triton", False)
    dispatch.triton_unavailable_reason.cache_clear()

    def install(version: str) -> None:
        monkeypatch.setattr(triton, "__version__", version)
        dispatch.triton_unavailable_reason.cache_clear()

    yield install
    monkeypatch.undo()
    dispatch.triton_unavailable_reason.cache_clear()


@pytest.mark.parametrize(("version", "parsed"), [("3.4.0", (3, 4, 0)), ("3.6.0+git1a2b3c", (3, 6, 0)),
                                                 ("3.10", (3, 10)), ("3.3.1rc2", (3, 3, 1)), ("dev", ())])
def test_versions_compare_by_their_release_numbers(version, parsed):
    assert dispatch.parse_version(version) == parsed


@pytest.mark.parametrize("version", ["3.4.0", "3.6.0", "3.10.0", "4.0.0+cu128"])
def test_triton_3_4_or_later_is_available(installed_triton, version):
    installed_triton(version)
    assert dispatch.triton_available()
    assert dispatch.resolve_backend(None, CUDA) == "triton"


@pytest.mark.parametrize("version", ["3.3.1", "3.2.0", "2.3.0"])
def test_an_older_triton_is_not_available(installed_triton, version):
    installed_triton(version)
    assert not dispatch.triton_available()
    assert f"triton {version} is installed" in dispatch.triton_unavailable_reason()


def test_automatic_choice_falls_back_to_torch_with_one_warning_per_process(installed_triton):
    installed_triton("3.3.1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dispatch.resolve_backend(None, CUDA) == "torch"
        assert dispatch.resolve_backend(None, CUDA) == "torch"
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message and "triton 3.3.1 is installed" in message and "triton >= 3.4" in message


def test_cpu_tensors_choose_without_a_warning(installed_triton):
    installed_triton("3.3.1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve_backend(None, torch.device("cpu")) in ("native", "torch")


def test_explicit_triton_with_an_older_triton_raises_naming_the_versions(installed_triton, monkeypatch):
    installed_triton("3.3.0")
    with pytest.raises(ValueError, match=r"needs triton >= 3\.4, but triton 3\.3\.0 is installed"):
        dispatch.resolve_backend("triton", CUDA)
    monkeypatch.setenv("FASTGRADSTATS_BACKEND", "triton")
    with pytest.raises(ValueError, match=r"triton 3\.3\.0 is installed"):
        dispatch.resolve_backend(None, CUDA)
