"""Fuzz the native C kernels: random sizes, dtypes, payloads, histograms and thread counts for a bounded time.

Run by tests/test_native_fuzz.py in a subprocess whose $CC builds the library under AddressSanitizer and
UBSan (any memory error or undefined behaviour aborts that process). Every histogram is also checked to equal
the torch backend's exactly, and every count row to be whole. Prints "fuzzed N cases" at the end.

    python tests/native_fuzz.py SECONDS SEED
"""

import sys
import time

import numpy as np
import torch

from fastgradstats import dispatch
from fastgradstats.backends import native_backend
from fastgradstats.hist import HistSpec

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
PAYLOADS = ("normal", "huge", "tiny", "specials", "constant", "bits")


def random_tensor(rng: np.random.Generator, dtype: torch.dtype, n: int | None = None) -> torch.Tensor:
    if n is None:
        n = int(rng.choice([0, 1, 2, 15, 16, 17, int(rng.integers(0, 5000))]))
    payload = PAYLOADS[rng.integers(len(PAYLOADS))]
    if payload == "bits":  # every bit pattern of the dtype, NaN payloads and subnormals included
        width = torch.finfo(dtype).bits
        raw = rng.integers(0, 1 << width, size=n, dtype=np.uint64).astype(f"uint{width}")
        view = {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}[width]
        return torch.from_numpy(raw.view(f"int{width}")).view(view).view(dtype)
    x = rng.standard_normal(n)
    if payload == "huge":
        x *= 10.0 ** rng.integers(30, 308)
    elif payload == "tiny":
        x *= 10.0 ** -rng.integers(30, 320)
    elif payload == "specials":
        x[rng.random(n) < 0.3] = rng.choice([np.nan, np.inf, -np.inf, 0.0, 5e-324, 1e-45])
    elif payload == "constant":
        x[:] = rng.choice([0.0, 1.0, 3e38, -1e300])
    with np.errstate(over="ignore"):
        t = torch.from_numpy(x).to(dtype)
    return t if rng.random() < 0.8 or n == 0 else t[:: int(rng.integers(1, 4))]


def random_spec(rng: np.random.Generator) -> HistSpec | None:
    kind = rng.choice(["none", "log2", "linear", "linear-range"])
    if kind == "none":
        return None
    if kind == "log2":
        low = int(rng.integers(-126, 128))
        return HistSpec.make("log2", min_exp=low, max_exp=int(rng.integers(low, 128)))
    bins = int(rng.choice([1, 2, 7, 64, 1000]))
    if kind == "linear":
        return HistSpec.make("linear", bins=bins)
    lo = float(rng.choice([-3.4e38, -1.0, 0.0, 1e-40, 1.0])) * float(rng.random())
    span = float(rng.choice([1e-30, 1.0, 1e20, 3e38]))
    try:
        return HistSpec.make("linear", bins=bins, range=(lo, lo + span))
    except ValueError:  # collapsed or overflowed in float32: refused up front, nothing to fuzz
        return None


def one_case(rng: np.random.Generator) -> None:
    torch.set_num_threads(int(rng.integers(1, 4)))
    chunk_size = int(rng.choice([1, 7, 64, 4096, native_backend.DEFAULT_CHUNK_SIZE]))
    if rng.random() < 0.3:  # pairs: a, b (and origin) of one shape, any dtypes
        shapes = [int(rng.integers(0, 3000)) for _ in range(int(rng.integers(1, 4)))]
        lists = [[random_tensor(rng, DTYPES[rng.integers(4)], n).contiguous() for n in shapes] for _ in "abo"]
        lists = [[t[: min(len(x) for x in layer)] for t in layer] for layer in zip(*lists)]
        lists = [list(column) for column in zip(*lists)]
        origin = lists[2] if rng.random() < 0.5 else None
        rows = dispatch.pair_raw_stats(lists[0], lists[1], origin, "native", chunk_size=chunk_size)
        assert rows.shape == (len(shapes), 5)
        return
    tensors = [random_tensor(rng, DTYPES[rng.integers(4)]) for _ in range(int(rng.integers(1, 5)))]
    spec = random_spec(rng)
    ours = dispatch.raw_stats(tensors, spec, "native", chunk_size=chunk_size)
    reference = dispatch.raw_stats(tensors, spec, "torch")
    assert torch.equal(ours.rows[:, 0], reference.rows[:, 0])
    if spec is not None:
        assert torch.equal(ours.hist, reference.hist), (spec, tensors)
        assert (ours.total_hist is None) == (reference.total_hist is None)
        if ours.total_hist is not None:
            assert torch.equal(ours.total_hist, reference.total_hist), (spec, tensors)


def main(seconds: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    deadline, cases = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        one_case(rng)
        cases += 1
    print(f"fuzzed {cases} cases")


if __name__ == "__main__":
    main(float(sys.argv[1]), int(sys.argv[2]))
