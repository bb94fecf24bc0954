"""The native C kernels under AddressSanitizer and UBSan: tests/native_fuzz.py for a bounded time
($FASTGRADSTATS_FUZZ_SECONDS, default 20) in a subprocess whose library is built with the sanitizers.

Skipped where the C compiler cannot build and load a sanitized library (no compiler, no libasan).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SANITIZE = ("-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer")
FUZZ = Path(__file__).with_name("native_fuzz.py")


def sanitizer_environment(tmp_path: Path) -> dict[str, str] | None:
    """The environment that builds and loads the kernels under the sanitizers, or None if unsupported."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    runtime = subprocess.run([compiler, "-print-file-name=libasan.so"], check=False, capture_output=True,
                             text=True).stdout.strip()
    probe = tmp_path / "probe.c"
    probe.write_text("int probe(int *x) { return x[0]; }\n")
    command = [compiler, *SANITIZE, "-shared", "-fPIC", str(probe), "-o", str(tmp_path / "probe.so")]
    built = subprocess.run(command, check=False, capture_output=True)
    if built.returncode != 0 or not os.path.isabs(runtime) or not os.path.exists(runtime):
        return None
    return {
        **os.environ,
        "CC": " ".join([compiler, *SANITIZE]),
        "FASTGRADSTATS_CACHE": str(tmp_path / "cache"),
        "LD_PRELOAD": runtime,  # the ASan runtime must come first in a process that did not start with it
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    }


def test_native_kernels_survive_fuzzing_under_sanitizers(tmp_path):
    env = sanitizer_environment(tmp_path)
    if env is None:
        pytest.skip("the C compiler cannot build a library with -fsanitize=address,undefined")
    seconds = os.environ.get("FASTGRADSTATS_FUZZ_SECONDS", "20")
    done = subprocess.run([sys.executable, str(FUZZ), seconds, "0"], check=False, env=env,
                          capture_output=True, text=True, timeout=float(seconds) + 300)
    assert done.returncode == 0, done.stderr[-5000:]
    assert done.stdout.startswith("fuzzed "), done.stdout
    assert int(done.stdout.split()[1]) > 0
