"""Building the native backend in a hostile environment: whatever $CC, $FASTGRADSTATS_CACHE and the cache
folder look like, a call still works (on the torch backend), the reason is reported and the automatic choice
warns once.

Most tests run a fresh interpreter with the environment under test, since the build happens once per process.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastgradstats as fgs
from fastgradstats.backends import native_backend

REPO = Path(__file__).resolve().parents[2]
needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="needs a C compiler")
needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                                reason="needs root to give a file to another user")

# Two calls on CPU tensors with the automatic choice, then what was chosen, why, and the warnings it gave.
PROBE = """
import json, warnings
import torch
import fastgradstats as fgs
from fastgradstats.backends import native_backend
from fastgradstats.dispatch import resolve_backend

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    sums = [fgs.tensor_stats([torch.ones(n)]).sum.item() for n in (3, 5)]
    backend = resolve_backend(None, torch.device("cpu"))
    reason = native_backend.unavailable_reason()
try:
    fgs.tensor_stats([torch.ones(2)], backend="native")
    explicit = ""
except ValueError as error:
    explicit = str(error)
print(json.dumps({"sums": sums, "backend": backend, "reason": reason, "explicit": explicit,
                  "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]}))
"""


def probe(tmp_path: Path, **env: str) -> dict:
    """Run PROBE in a fresh interpreter in ``tmp_path``, with ``env`` over a cache folder in tmp_path."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("CC", "FASTGRADSTATS_BACKEND", "FASTGRADSTATS_CACHE")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    environment["FASTGRADSTATS_CACHE"] = str(tmp_path / "cache")
    environment.update(env)
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=environment, check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_falls_back(result: dict, reason: str) -> None:
    """The calls ran on the torch backend, the reason says ``reason``, explicit "native" raised it, one
    warning carried it."""
    assert result["sums"] == [3.0, 5.0]
    assert result["backend"] == "torch"
    assert reason in result["reason"]
    assert result["explicit"] == f"backend 'native' is unavailable: {result['reason']}"
    assert len(result["warnings"]) == 1 and result["reason"] in result["warnings"][0]


def test_a_cc_that_is_not_a_command_line_falls_back(tmp_path):
    result = probe(tmp_path, CC='gcc "unterminated')
    assert_falls_back(result, "$CC='gcc \"unterminated' is not a valid command line")


def test_a_cc_that_does_not_exist_falls_back(tmp_path):
    result = probe(tmp_path, CC=str(tmp_path / "no-such-cc"))
    assert_falls_back(result, "cannot run the C compiler")


def test_an_empty_cache_setting_falls_back_and_builds_nothing_here(tmp_path):
    result = probe(tmp_path, FASTGRADSTATS_CACHE="")
    assert_falls_back(result, "$FASTGRADSTATS_CACHE is set but empty")
    assert not list(tmp_path.rglob("*.so"))


def test_a_relative_cache_setting_falls_back(tmp_path):
    result = probe(tmp_path, FASTGRADSTATS_CACHE="cache")
    assert_falls_back(result, "$FASTGRADSTATS_CACHE='cache' is not an absolute path")
    assert not (tmp_path / "cache").exists()


def test_a_cache_path_that_is_a_file_falls_back(tmp_path):
    (tmp_path / "cache").write_text("not a folder")
    assert_falls_back(probe(tmp_path), f"cannot create the cache folder {tmp_path / 'cache'}")


@needs_compiler
def test_the_cache_folder_is_created_private(tmp_path):
    result = probe(tmp_path, FASTGRADSTATS_CACHE=str(tmp_path / "a" / "cache"))
    assert result["backend"] == "native" and result["reason"] == "" and result["warnings"] == []
    assert stat.S_IMODE((tmp_path / "a" / "cache").stat().st_mode) == 0o700
    assert len(list((tmp_path / "a" / "cache").glob("native_stats-*.so"))) == 1


@needs_compiler
def test_a_cc_with_arguments_still_builds(tmp_path):
    result = probe(tmp_path, CC="cc -DFASTGRADSTATS_UNUSED=1")
    assert result["backend"] == "native", result["reason"]


@needs_compiler
def test_a_compiler_without_openmp_builds_without_it(tmp_path):
    """A compiler that rejects -fopenmp (clang without libomp) still gives the native backend, on Python
    threads, with no warning; the library built with OpenMP is not kept."""
    cc = tmp_path / "cc-without-openmp"
    cc.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec cc "$@"\n')
    cc.chmod(0o755)
    result = probe(tmp_path, CC=str(cc))
    assert result["backend"] == "native" and result["reason"] == "" and result["warnings"] == []
    assert result["sums"] == [3.0, 5.0]
    assert len(list((tmp_path / "cache").glob("native_stats-*.so"))) == 1


@pytest.mark.parametrize("mode", [0o770, 0o777])
def test_a_cache_folder_others_can_write_is_not_used(tmp_path, mode):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(mode)
    assert_falls_back(probe(tmp_path), f"refusing the cache folder {cache}: other users can write to it")
    assert not list(cache.iterdir())


@needs_root
def test_a_cache_folder_of_another_user_is_not_used(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    os.chown(cache, 65534, 65534)
    assert_falls_back(probe(tmp_path), f"refusing the cache folder {cache}: it belongs to uid 65534")
    assert not list(cache.iterdir())


@needs_compiler
@needs_root
def test_a_library_of_another_user_is_not_loaded(tmp_path):
    assert probe(tmp_path)["backend"] == "native"
    (library,) = (tmp_path / "cache").glob("native_stats-*.so")
    os.chown(library, 65534, 65534)
    assert_falls_back(probe(tmp_path), f"refusing the library {library}: it belongs to uid 65534")


@needs_compiler
def test_a_library_others_can_write_is_not_loaded(tmp_path):
    assert probe(tmp_path)["backend"] == "native"
    (library,) = (tmp_path / "cache").glob("native_stats-*.so")
    library.chmod(0o666)
    assert_falls_back(probe(tmp_path), f"refusing the library {library}: other users can write to it")


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A cache folder in tmp_path, and a build that forgets its result afterwards."""
    monkeypatch.setenv("FASTGRADSTATS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTGRADSTATS_BACKEND", raising=False)
    native_backend._build.cache_clear()
    yield tmp_path
    native_backend._build.cache_clear()


def process_state(pid: int) -> str:
    """The state letter of process ``pid`` in /proc ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_compiler_that_hangs_is_killed_with_its_children(fresh_build, monkeypatch):
    children = fresh_build / "children"
    hanging_cc = fresh_build / "hanging-cc"
    hanging_cc.write_text(f'#!/bin/sh\nsleep 60 &\necho $! > "{children}"\nwait\n')
    hanging_cc.chmod(0o755)
    monkeypatch.setenv("CC", str(hanging_cc))
    monkeypatch.setattr(native_backend, "COMPILE_TIMEOUT_S", 1)
    started = time.monotonic()
    with pytest.warns(RuntimeWarning, match="took longer than 1 s"):
        assert not native_backend.available()
    assert time.monotonic() - started < 30
    assert native_backend.unavailable_reason() == "compiling native_stats.c took longer than 1 s"
    sleeper = int(children.read_text())
    deadline = time.monotonic() + 10
    while process_state(sleeper) not in ("", "Z", "X") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_state(sleeper) in ("", "Z", "X")
    assert not list((fresh_build / "cache").rglob("*.so"))


def test_a_missing_compiler_falls_back_without_a_warning(fresh_build, monkeypatch, recwarn):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native_backend.shutil, "which", lambda name: None)
    assert not native_backend.available()
    assert native_backend.unavailable_reason() == "no C compiler found (set $CC or install gcc)"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert fgs.tensor_stats([torch.ones(3)]).sum.tolist() == [3.0]
