"""The "native" CPU backend: the one-pass C kernels of ``native_stats.c``, run on one thread per core.

Same raw rows and histograms as the torch backend (the reference it is tested against), but each element is
read once for all statistics and histograms, where the torch backend makes a pass per reduction. The C file
is compiled on first use with the system's C compiler (``$CC``, else ``cc``; ``-O3 -march=native``) into
``$FASTGRADSTATS_CACHE`` (default ``~/.cache/fastgradstats``) and loaded with ctypes, which releases the GIL
during a call. Tensors are cut into chunks of ``chunk_size`` elements, grouped into contiguous chunk ranges
of about the same number of elements (RANGES_PER_THREAD per thread), which the threads take in turn; each
chunk writes its own row and each range its own histogram counts, merged in chunk order, so results do not
depend on the thread count. The threads are torch's own intra-op (OpenMP) threads when the compiler has
OpenMP (``-fopenmp``; torch's libgomp.so.1 is the one loaded): they are the ones still spinning after
torch's last parallel op (a backward), where threads of our own would compete with them for the cores
(measured: 12.2 ms right after a ``torch.sum`` against 7.9 ms after a pause, bfloat16 GPT-2-small
statistics). Without OpenMP, and in a forked child, a pool of Python threads runs them. Rows are float64
(the C file says how each block is summed).

This is the default backend for CPU tensors whenever the compiler is there; ``backend="torch"`` or
``FASTGRADSTATS_BACKEND=torch`` selects the reference instead.

Building never raises: when it fails, :func:`available` is False, :func:`unavailable_reason` says why, the
automatic choice falls back to the torch backend with one RuntimeWarning (none when there is simply no
compiler), and ``backend="native"`` raises ValueError with the reason. Failures include a ``$CC`` that is not
a valid command line, an empty or relative ``$FASTGRADSTATS_CACHE``, a compile that fails or takes longer
than ``COMPILE_TIMEOUT_S``, and a cache folder or library that is not private: the folder is created with
mode 0o700, and an existing folder or library that belongs to another user or that others can write to is
not used (no fallback folder: fix its mode or point ``$FASTGRADSTATS_CACHE`` elsewhere).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..hist import HistSpec
from ..rows import PAIR_K, K, merge_rows_by_index

SOURCE = Path(__file__).with_name("native_stats.c")
COMPILE_FLAGS = ("-O3", "-march=native", "-std=gnu11", "-fPIC", "-shared")
# Built with OpenMP when the compiler has it: the library then runs its chunk ranges on torch's own intra-op
# threads (torch loads libgomp.so.1 first, so the loader reuses it), else on a pool of Python threads.
OPENMP_FLAG = "-fopenmp"
# The process that loaded an OpenMP build: GNU OpenMP hangs in a forked child once its parent has run a
# parallel region, so a child takes the Python threads.
_openmp_pid: int | None = None
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
HIST_KINDS = {None: 0, "log2": 1, "linear": 2}
NAME = "native"
DEFAULT_CHUNK_SIZE = 1 << 16
MIN_ELEMENTS_PER_THREAD = 1 << 18  # below this, handing work to another thread costs more than it saves
# Chunk ranges per thread, taken in turn by whichever thread is free: a thread that another process delays
# leaves its later ranges to the others (on a busy 2-core machine, a fixed half each waits for the slower).
RANGES_PER_THREAD = 4
COMPILE_TIMEOUT_S = 120  # a compiler that hangs (a stuck wrapper, a dead network disk) is given up on

_ADDRESS, _INT32, _INT64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
_SIGNATURES = {
    "fgs_tensor_stats": [_INT64, _INT64, _ADDRESS, _ADDRESS, _ADDRESS, _ADDRESS, _ADDRESS, _INT32, _INT32,
                         _INT32, _ADDRESS, _ADDRESS],
    "fgs_linear_hist": [_INT64, _INT64, _ADDRESS, _ADDRESS, _ADDRESS, _ADDRESS, _INT32, _ADDRESS, _INT64,
                        _ADDRESS, _ADDRESS],
    "fgs_pair_stats": [_INT64, _INT64, _ADDRESS, _ADDRESS, _ADDRESS, _ADDRESS, _ADDRESS, _ADDRESS],
}
# Each entry point over chunk ranges: (count, bounds, the arguments after first and last, one int64 stride per
# histogram output).
_SIGNATURES |= {
    "fgs_tensor_stats_ranges": [_INT32, _ADDRESS, *_SIGNATURES["fgs_tensor_stats"][2:], _INT64],
    "fgs_linear_hist_ranges": [_INT32, _ADDRESS, *_SIGNATURES["fgs_linear_hist"][2:], _INT64, _INT64],
    "fgs_pair_stats_ranges": [_INT32, _ADDRESS, *_SIGNATURES["fgs_pair_stats"][2:]],
    "fgs_openmp": [],
}


def available() -> bool:
    """True when the kernels are compiled (or compile now) and load."""
    return _build()[0] is not None


def unavailable_reason() -> str:
    """Why :func:`available` is False ("" when it is True): no compiler, a ``$CC`` that is not a command line,
    a cache folder that is unset, not private or not writable, a failed or timed-out compile, a library that
    does not load."""
    return _build()[1]


class _Unavailable(Exception):
    """Why the kernels cannot be built or loaded; the message is what :func:`unavailable_reason` returns."""


class _CompileFailed(_Unavailable):
    """The compiler ran and exited with an error."""


@functools.cache
def _build() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernels, "") or (None, why they could not be built). Never raises; every failure except a
    missing compiler also warns once (RuntimeWarning), since the automatic choice then falls back to torch."""
    try:
        command = _compile_command()
        if command is None:
            return None, "no C compiler found (set $CC or install gcc)"
        try:
            library = _compile_and_load([*command[:-2], OPENMP_FLAG, *command[-2:]])
        except _CompileFailed:  # e.g. clang without libomp: built without OpenMP, run on Python threads
            library = _compile_and_load(command)
    except _Unavailable as error:
        warnings.warn(f"fastgradstats: the native CPU backend is unavailable ({error}); CPU tensors use the "
                      "torch backend instead", RuntimeWarning, stacklevel=3)
        return None, str(error)
    for name, argtypes in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int
    global _openmp_pid
    _openmp_pid = os.getpid() if library.fgs_openmp() else None
    return library, ""


def _compile_command() -> list[str] | None:
    """The compile command up to its output file: ``$CC`` split as a shell would (it may carry arguments, as
    in ``CC="cc -fsanitize=address"``), else ``cc`` or ``gcc``; None when there is no compiler."""
    cc = os.environ.get("CC", "")
    try:
        compiler = shlex.split(cc)
    except ValueError as error:
        raise _Unavailable(f"$CC={cc!r} is not a valid command line: {error}") from None
    if not compiler:
        found = shutil.which("cc") or shutil.which("gcc")
        if found is None:
            return None
        compiler = [found]
    return [*compiler, *COMPILE_FLAGS, str(SOURCE), "-o"]


def _compile_and_load(command: list[str]) -> ctypes.CDLL:
    """The library of ``command``'s output from the private cache folder, compiled there first if missing.

    The file name holds a hash of the source, the whole compile command and the CPU's features, so a change of
    any of them builds a new library."""
    try:
        source = SOURCE.read_bytes()
    except OSError as error:
        raise _Unavailable(f"cannot read {SOURCE}: {error.strerror or error}") from None
    key = hashlib.sha256(b"\0".join([source, " ".join(command).encode(), _cpu_signature()])).hexdigest()[:16]
    path = _private_folder(_cache_dir()) / f"native_stats-{key}.so"
    try:
        if not path.exists():
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                built = Path(tmp) / path.name  # built aside, then renamed: concurrent builders never clash
                _run_compiler([*command, str(built)])
                os.replace(built, path)
        _check_private(path, path.stat(), "library")
        return ctypes.CDLL(str(path))
    except OSError as error:
        raise _Unavailable(f"building or loading {path} failed: {error}") from None


def _run_compiler(command: list[str]) -> None:
    """Run the compiler in its own process group; raises _Unavailable when it cannot start, fails, or runs
    past COMPILE_TIMEOUT_S (then the whole group, e.g. gcc with its cc1 and as, is killed)."""
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, encoding="utf-8", errors="replace",
                                   start_new_session=True)
    except OSError as error:
        raise _Unavailable(f"cannot run the C compiler {command[0]!r}: {error.strerror or error}") from None
    with process:
        try:
            output, _ = process.communicate(timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise _Unavailable(f"compiling {SOURCE.name} took longer than {COMPILE_TIMEOUT_S} s") from None
    if process.returncode != 0:
        details = output.strip() or f"{command[0]} exited with status {process.returncode}, printing nothing"
        raise _CompileFailed(f"compiling {SOURCE.name} failed: {details}")


def _cache_dir() -> Path:
    """``$FASTGRADSTATS_CACHE`` (an absolute path), else ``$XDG_CACHE_HOME/fastgradstats``, else
    ``~/.cache/fastgradstats``. An empty or relative ``$FASTGRADSTATS_CACHE`` is refused (it would build
    into, and load from, whatever the current directory is); a relative ``$XDG_CACHE_HOME`` is ignored, as
    the XDG specification says."""
    if "FASTGRADSTATS_CACHE" in os.environ:
        configured = os.environ["FASTGRADSTATS_CACHE"]
        if not configured:
            raise _Unavailable("$FASTGRADSTATS_CACHE is set but empty (unset it, or give it a folder)")
        if not os.path.isabs(configured):
            raise _Unavailable(f"$FASTGRADSTATS_CACHE={configured!r} is not an absolute path")
        return Path(configured)
    xdg_cache = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg_cache):
        return Path(xdg_cache) / "fastgradstats"
    home = os.path.expanduser("~")
    if not os.path.isabs(home):
        raise _Unavailable("no home folder to cache the library in (set $FASTGRADSTATS_CACHE)")
    return Path(home) / ".cache" / "fastgradstats"


def _private_folder(folder: Path) -> Path:
    """``folder``, created with mode 0o700 when missing. Raises _Unavailable when it cannot be created or is
    not private (another user could otherwise put there the library this process loads)."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
    except OSError as error:
        raise _Unavailable(f"cannot create the cache folder {folder}: {error.strerror or error}") from None
    _check_private(folder, info, "cache folder")
    return folder


def _check_private(path: Path, info: os.stat_result, what: str) -> None:
    """Raise _Unavailable unless ``path`` (the cache folder or the library; ``info`` is its stat) belongs to
    this user and only this user can write to it."""
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        problem = f"it belongs to uid {info.st_uid}, not to this user (uid {os.getuid()})"
        remedy = "set $FASTGRADSTATS_CACHE to a folder of your own"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"other users can write to it (mode {stat.S_IMODE(info.st_mode):04o})"
        remedy = "chmod go-w it, or set $FASTGRADSTATS_CACHE to a private folder"
    else:
        return
    if what == "library":
        remedy = "delete it to rebuild"
    raise _Unavailable(f"refusing the {what} {path}: {problem}; {remedy}")


def _cpu_signature() -> bytes:
    """What -march=native depends on: the architecture and the CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {flags}".encode()


# ------------------------------------------------------------------------------------------ chunk tables


class _Chunks:
    """Chunks of up to ``chunk_size`` elements of the non-empty tensors of one or more parallel lists.

    addresses: int64 [lists, C] address of each chunk's first element in each list;
    dtypes: int32 [C, lists] dtype codes; numel: int64 [C]; layer: int64 [C] index of the chunk's tensor.
    """

    def __init__(self, lists: Sequence[Sequence[torch.Tensor]], chunk_size: int) -> None:
        sizes = np.array([t.numel() for t in lists[0]], dtype=np.int64)
        per_tensor = -(-sizes // chunk_size)  # empty tensors own no chunk
        self.layer = np.repeat(np.arange(len(sizes), dtype=np.int64), per_tensor)
        self.count = len(self.layer)
        index_in_tensor = np.arange(self.count) - np.repeat(np.cumsum(per_tensor) - per_tensor, per_tensor)
        start = index_in_tensor * chunk_size
        self.numel = np.minimum(sizes[self.layer] - start, chunk_size)
        self.addresses = np.zeros((len(lists), self.count), dtype=np.int64)
        self.dtypes = np.zeros((self.count, len(lists)), dtype=np.int32)
        for i, tensors in enumerate(lists):
            addresses = np.array([t.data_ptr() for t in tensors], dtype=np.int64)
            itemsizes = np.array([t.element_size() for t in tensors], dtype=np.int64)
            codes = np.array([DTYPE_CODES[t.dtype] for t in tensors], dtype=np.int32)
            self.addresses[i] = addresses[self.layer] + start * itemsizes[self.layer]
            self.dtypes[:, i] = codes[self.layer]


def _checked(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """The tensors, once checked to be what the kernels can read from their ``data_ptr()``: contiguous CPU
    tensors of a dtype in DTYPE_CODES (dispatch flattens them)."""
    for t in tensors:
        if t.device.type != "cpu":
            raise ValueError(f"the native backend needs CPU tensors, got {t.device}")
        if t.dtype not in DTYPE_CODES:
            raise TypeError(f"the native backend reads float32/float64/bfloat16/float16, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError("the native backend reads contiguous tensors (dispatch.raw_stats flattens them)")
    return tensors


def _ranges_by_thread(numel: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous chunk ranges [first, last) with about equal element counts: one when a single thread is to
    be used, else RANGES_PER_THREAD per thread to use (some may be empty)."""
    total = int(numel.sum())
    threads = max(1, min(torch.get_num_threads(), total // MIN_ELEMENTS_PER_THREAD))
    count = 1 if threads == 1 else threads * RANGES_PER_THREAD
    ends = np.searchsorted(np.cumsum(numel), total * np.arange(1, count) / count) + 1
    bounds = [0, *np.minimum(ends, len(numel)).tolist(), len(numel)]
    return list(itertools.pairwise(bounds))


@functools.cache
def _pool(threads: int, pid: int) -> concurrent.futures.ThreadPoolExecutor:
    """A pool per process: a forked child does not inherit its parent's threads."""
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="fastgradstats")


def _run(name: str, ranges: list[tuple[int, int]], args: Sequence,
         outputs: Sequence[np.ndarray] = ()) -> None:
    """Kernel ``name`` over each chunk range (first, last), with ``args`` after first and last and then, for
    range i, ``output[i]`` of each output (arrays with one leading entry per range). With OpenMP, one call of
    ``name``_ranges runs them on torch's intra-op threads (not in a forked child); else parallel Python
    threads take the ranges in turn. Raises if a range failed."""
    kernels = _kernels()
    if len(ranges) > 1 and os.getpid() == _openmp_pid:
        bounds = np.array([first for first, _ in ranges] + [ranges[-1][1]], dtype=np.int64)
        strides = [output[0].size for output in outputs]
        failed = getattr(kernels, f"{name}_ranges")(len(ranges), bounds.ctypes.data, *args,
                                                      *(output.ctypes.data for output in outputs), *strides)
    else:
        def call(index: int, first: int, last: int) -> int:
            addresses = (output[index].ctypes.data for output in outputs)
            return getattr(kernels, name)(first, last, *args, *addresses)

        if len(ranges) == 1:
            failed = call(0, *ranges[0])
        else:
            pool = _pool(max(1, min(torch.get_num_threads(), len(ranges))), os.getpid())
            failed = any(pool.map(lambda item: call(item[0], *item[1]), enumerate(ranges)))
    if failed:
        raise MemoryError("fastgradstats native backend: out of memory for its scratch buffers")


def _kernels() -> ctypes.CDLL:
    library, reason = _build()
    if library is None:
        raise RuntimeError(f"the native backend is unavailable: {reason}")
    return library


# ------------------------------------------------------------------------------------------- statistics


def raw_rows(
    tensors: Sequence[torch.Tensor],
    spec: HistSpec | None = None,
    ranges: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw rows float64 [L, K] and int64 [L, B] log2 or fixed-range histogram counts of 1-D contiguous CPU
    tensors, as :func:`torch_backend.raw_rows` (the backend protocol of
    :class:`fastgradstats.dispatch.Backend`)."""
    chunks = _Chunks([_checked(tensors)], chunk_size)
    chunk_ranges = _ranges_by_thread(chunks.numel)
    bins = spec.bins if spec else 0
    chunk_rows = np.empty((chunks.count, K), dtype=np.float64)
    hist = np.zeros((len(chunk_ranges), len(tensors), bins), dtype=np.int64)
    layer_ranges = None if ranges is None else np.ascontiguousarray(ranges.numpy())

    _run("fgs_tensor_stats", chunk_ranges, (
        chunks.addresses[0].ctypes.data, chunks.numel.ctypes.data, chunks.dtypes.ctypes.data,
        chunks.layer.ctypes.data, chunk_rows.ctypes.data, HIST_KINDS[spec.kind if spec else None], bins,
        spec.min_exp if spec else 0, _address(layer_ranges)), (hist,))
    rows = merge_rows_by_index(torch.from_numpy(chunk_rows), torch.from_numpy(chunks.layer), len(tensors))
    return rows, torch.from_numpy(hist.sum(0)) if spec else None


def linear_hist(
    tensors: Sequence[torch.Tensor],
    spec: HistSpec,
    ranges: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 [L, B] linear-histogram counts of each 1-D contiguous CPU tensor over its range in ``ranges``
    float32 [L + 1, 3], and int64 [B] counts of all of them over the last range."""
    chunks = _Chunks([_checked(tensors)], chunk_size)
    chunk_ranges = _ranges_by_thread(chunks.numel)
    all_ranges = np.ascontiguousarray(ranges.numpy())
    hist = np.zeros((len(chunk_ranges), len(tensors), spec.bins), dtype=np.int64)
    totals = np.zeros((len(chunk_ranges), spec.bins), dtype=np.int64)

    _run("fgs_linear_hist", chunk_ranges, (
        chunks.addresses[0].ctypes.data, chunks.numel.ctypes.data, chunks.dtypes.ctypes.data,
        chunks.layer.ctypes.data, spec.bins, all_ranges.ctypes.data, len(tensors)), (hist, totals))
    return torch.from_numpy(hist.sum(0)), torch.from_numpy(totals.sum(0))


def _address(array: np.ndarray | None) -> int | None:
    return None if array is None else array.ctypes.data


def pair_rows(
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    origin: Sequence[torch.Tensor] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Pair rows float64 [L, PAIR_K] of 1-D contiguous CPU tensors a[i], b[i] (and origin[i]) with equal
    element counts, as :func:`torch_backend.pair_rows`."""
    lists = [_checked(tensors) for tensors in (a, b, *(() if origin is None else (origin,)))]
    chunks = _Chunks(lists, chunk_size)
    chunk_rows = np.empty((chunks.count, PAIR_K), dtype=np.float64)
    dtypes = np.zeros((chunks.count, 3), dtype=np.int32)
    dtypes[:, : len(lists)] = chunks.dtypes
    origin_addresses = chunks.addresses[2] if origin is not None else np.zeros(chunks.count, dtype=np.int64)

    _run("fgs_pair_stats", _ranges_by_thread(chunks.numel), (
        chunks.addresses[0].ctypes.data, chunks.addresses[1].ctypes.data, origin_addresses.ctypes.data,
        dtypes.ctypes.data, chunks.numel.ctypes.data, chunk_rows.ctypes.data))
    rows = torch.zeros(len(lists[0]), PAIR_K, dtype=torch.float64)
    return rows.index_add_(0, torch.from_numpy(chunks.layer), torch.from_numpy(chunk_rows))
