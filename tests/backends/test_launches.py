"""Launch counting (fastgradstats.launches) and the launches our calls make today, pinned as upper bounds.

The pins are today's measured counts (Triton backend, in the interpreter on the CPU): a change that adds a
launch fails here. Issue 11 asks for far fewer; whoever lowers a count lowers its pin.
"""

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from conftest import DEVICE
from torch.autograd import DeviceType

import fastgradstats as fgs
from fastgradstats import launches

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
pytestmark = pytest.mark.skipif(not fgs.dispatch.triton_available(), reason="needs triton")


@pytest.fixture
def triton_backend(monkeypatch):
    """clip_grad_norm_ takes no backend argument: choose it through the environment."""
    monkeypatch.setenv("FASTGRADSTATS_BACKEND", "triton")


def measured(call):
    """Launches of one call after a warm-up call (which fills the segment-table cache)."""
    call()
    with launches.count_launches() as counted:
        call()
    return counted


# --- the counter -------------------------------------------------------------------------------------------


def test_a_torch_op_is_one_launch_and_views_and_allocations_are_none():
    x = torch.randn(4, 6, device=DEVICE)
    with launches.count_launches() as counted:
        y = x.t().reshape(-1)[2:].unsqueeze(0).detach()  # views only (the reshape of a transpose copies)
        torch.empty(5, device=DEVICE)
        (y * 2).sum()
    assert counted.torch_ops == Counter({"aten.clone": 1, "aten.mul": 1, "aten.sum": 1}), counted.breakdown()
    assert counted.triton == Counter() and counted.total == 3 and counted.syncs == 0


def test_item_is_a_sync_not_a_launch():
    x = torch.ones(3, device=DEVICE)
    with launches.count_launches() as counted:
        x.sum().item()
        float(x[0])
    assert counted.syncs == 2 and counted.total == 1, counted.breakdown()


def test_wrapped_python_scalars_and_dtype_queries_are_not_launches():
    x = torch.randn(5, device=DEVICE)
    with launches.count_launches() as counted:
        torch.where(x > 0, x, 0.0)
        torch.promote_types(torch.float32, torch.bfloat16)
    assert counted.torch_ops == Counter({"aten.gt": 1, "aten.where": 1}), counted.breakdown()


def test_view_ops_are_views_by_their_schema():
    for name in launches.VIEW_OPS - {"aten._unsafe_view"}:  # _unsafe_view: a view that says it is not
        packet = getattr(torch.ops.aten, name.removeprefix("aten."))
        assert any(getattr(packet, overload).is_view for overload in packet.overloads()), name


@triton.jit
def _add_one_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


def test_a_triton_launch_is_counted_by_kernel_name_and_its_argument_copies_are_not():
    x = torch.zeros(10, device=DEVICE)
    with launches.count_launches() as counted:
        _add_one_kernel[(1,)](x, 10, BLOCK=16)
        _add_one_kernel[(1,)](x, 10, BLOCK=16)
    assert counted.triton == Counter({"_add_one_kernel": 2}) and counted.torch_ops == Counter()
    assert counted.total == 2 and torch.equal(x, torch.full_like(x, 2.0))


def test_blocks_nest_and_restore_the_triton_launchers():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    runs = InterpretedFunction.run, JITFunction.run
    x = torch.zeros(4, device=DEVICE)
    with launches.count_launches() as outer:
        x.add_(1)
        with launches.count_launches() as inner:
            _add_one_kernel[(1,)](x, 4, BLOCK=16)
            x.mul_(2)
    assert inner.triton == outer.triton == Counter({"_add_one_kernel": 1})
    assert inner.torch_ops == Counter({"aten.mul_": 1}) and outer.torch_ops == Counter({"aten.add_": 1,
                                                                                          "aten.mul_": 1})
    assert (InterpretedFunction.run, JITFunction.run) == runs
    _add_one_kernel[(1,)](x, 4, BLOCK=16)
    assert outer.total == 3 and torch.equal(x, torch.full_like(x, 5.0))


def test_profiled_device_events_are_sorted_into_kernels_copies_and_sets():
    def event(name, device_type=DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=device_type)

    found = launches.device_launches([
        event("_chunk_kernel"), event("_chunk_kernel"), event("Memcpy HtoD (Pinned -> Device)"),
        event("Memset (Device)"), event("cudaLaunchKernel", DeviceType.CPU),
        event("aten::sum", DeviceType.CPU),
    ])
    assert found.kernels == Counter({"_chunk_kernel": 2}) and found.total == 2
    assert sum(found.memcpys.values()) == 1 and sum(found.memsets.values()) == 1


def test_launches_module_prints_and_writes_every_call(tmp_path, capsys):
    path = tmp_path / "launches.json"
    assert launches.main(["--device", DEVICE, "--backend", "triton", "--json", str(path)]) == 0
    results = json.loads(path.read_text())["calls"]
    assert set(results) == set(launches.CALLS)
    out = capsys.readouterr().out
    for name, result in results.items():
        assert f"{name}: {result['counted']['total']} launches" in out


# --- what our calls launch: issue 11's economy --------------------------------------------------------------
# Two dtype groups (float32 and bfloat16): per group stage 1 and its merge, then one finalize kernel that
# derives every field of every layer and of the total (reading a field is then a view).


def test_tensor_stats_launches(triton_backend):
    counted = measured(launches.tensor_stats_call(torch.device(DEVICE), "triton"))
    # 2 x (stage 1 + merge), the finalize kernel, and the zeroed histogram
    assert counted.triton == {"_chunk_kernel": 2, "_merge_kernel": 2, "_tensor_finalize_kernel": 1}, \
        counted.breakdown()
    assert counted.total <= 8 and counted.total == 6, counted.breakdown()
    assert counted.syncs == 0, counted.breakdown()


def test_pair_stats_launches(triton_backend):
    counted = measured(launches.pair_stats_call(torch.device(DEVICE), "triton"))
    assert counted.triton == {"_pair_chunk_kernel": 2, "_merge_kernel": 2, "_pair_finalize_kernel": 1}, \
        counted.breakdown()
    assert counted.total == 5, counted.breakdown()
    assert counted.syncs == 0, counted.breakdown()


def test_clip_grad_norm_launches(triton_backend):
    counted = measured(launches.clip_call(torch.device(DEVICE)))
    # the statistics (5), torch's clip coefficient in one kernel, one _foreach_mul_ per dtype group
    assert counted.torch_ops["aten._foreach_mul_"] == 2, counted.breakdown()
    assert counted.triton["_clip_kernel"] == 1, counted.breakdown()
    assert counted.total <= 8, counted.breakdown()
    assert counted.syncs == 0, counted.breakdown()
