"""One host snapshot per record: a tracked step written to JSONL, TensorBoard and W&B copies the record's
device tensors to the host once, whatever the number of sinks and tracked kinds."""

import contextlib

import pytest
import torch
from conftest import DEVICE
from torch.utils._python_dispatch import TorchDispatchMode

import fastgradstats as fgs
from fastgradstats import results

pytest.importorskip("wandb")
pytest.importorskip("tensorboard")


class FakeRun:
    """Stands in for a wandb run: keeps what ``log`` receives."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log(self, payload: dict, step: int) -> None:
        self.logged.append((step, payload))


class Transfers(TorchDispatchMode):
    """Counts device-to-host transfers while ``counting``: calls of results.to_host (the one packed copy),
    and, outside it, scalar reads (``item()``: aten._local_scalar_dense) and copies from another device to
    the CPU. Install with ``installed(monkeypatch)``; ``counted(sink)`` counts during the sink's writes."""

    def __init__(self) -> None:
        super().__init__()
        self.packed = 0
        self.other: list[str] = []
        self.counting = False
        self._inside_to_host = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.counting and not self._inside_to_host:
            if func is torch.ops.aten._local_scalar_dense.default:
                self.other.append("item")
            elif func is torch.ops.aten._to_copy.default and _to_cpu(args[0], kwargs.get("device")):
                self.other.append("to cpu")
            elif func is torch.ops.aten.copy_.default and _to_cpu(args[1], args[0].device):
                self.other.append("copy_ to cpu")
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def installed(self, monkeypatch):
        real_to_host = results.to_host

        def to_host(packed: torch.Tensor) -> torch.Tensor:
            self.packed += self.counting
            self._inside_to_host = True
            try:
                return real_to_host(packed)
            finally:
                self._inside_to_host = False

        monkeypatch.setattr(results, "to_host", to_host)
        with self:
            yield self

    @contextlib.contextmanager
    def count(self):
        self.counting = True
        try:
            yield
        finally:
            self.counting = False

    def counted(self, sink):
        """``sink`` with its writes counted."""
        write = sink.write

        def counted_write(record) -> None:
            with self.count():
                write(record)

        sink.write = counted_write
        return sink


def _to_cpu(source: torch.Tensor, device) -> bool:
    return device is not None and torch.device(device).type == "cpu" and source.device.type != "cpu"


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        optimizer.zero_grad()
        model(torch.randn(16, 4, generator=generator).to(DEVICE)).pow(2).mean().backward()
        optimizer.step()


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(DEVICE)


@pytest.mark.parametrize("track, split", [
    (("grad", "param", "update", "grad_cos", "init"), None),
    (("grad", "param", "update", "optim"), None),
    (("grad", "update"), {r"^0\.weight$": 4}),
], ids=["five kinds", "optim", "split"])
def test_a_record_written_to_three_sinks_reaches_the_host_in_one_copy(tmp_path, monkeypatch, track, split):
    model = make_model()
    transfers = Transfers()
    run = FakeRun()
    sinks = [transfers.counted(sink) for sink in (fgs.sinks.JSONL(tmp_path / "stats.jsonl"),
                                                  fgs.sinks.TensorBoard(tmp_path / "tb"),
                                                  fgs.sinks.Wandb(run, summarize_splits=2))]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    monitor = fgs.Monitor(model, track=track, sinks=sinks, split=split).attach(optimizer)
    train(model, optimizer, steps=2)
    with transfers.installed(monkeypatch):
        train(model, optimizer, steps=1)
    record = monitor.history[-1]
    assert record.step == 3 and set(record.stats) == set(track)
    assert (transfers.packed, transfers.other) == (1, [])
    assert run.logged[-1][0] == 3 and len((tmp_path / "stats.jsonl").read_text().splitlines()) == 3
    monitor.close()


def test_nothing_reaches_the_host_before_the_record_is_written(monkeypatch):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    monitor = fgs.Monitor(model, track=("grad", "param", "update", "grad_cos", "init")).attach(optimizer)
    transfers = Transfers()
    with transfers.installed(monkeypatch):
        with transfers.count():
            train(model, optimizer, steps=2)
        record = monitor.history[-1]
        assert (transfers.packed, transfers.other) == (0, [])
        assert isinstance(record.alert_count, torch.Tensor) and transfers.other == []
        with transfers.count():
            first, again = record.to_dict(), record.to_dict()
            alerts = record.alerts
            record.stats["grad"].table()
            record.stats["update"].split_summary()
    assert (transfers.packed, transfers.other) == (1, [])
    assert first == again and first["alert_count"] == len(alerts) == record.alert_count.item()


def test_each_to_dict_is_a_new_dict_so_a_sink_may_edit_its_own():
    model = make_model()
    model(torch.randn(2, 4, device=DEVICE)).sum().backward()
    record = fgs.Monitor(model).step()
    first = record.to_dict()
    del first["grad"]["layers"]["0.weight"]
    first["grad"]["total"]["l2"] = -1.0
    again = record.to_dict()
    assert "0.weight" in again["grad"]["layers"] and again["grad"]["total"]["l2"] > 0
