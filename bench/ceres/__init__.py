"""Build and run the Ceres reference runner (``runner.cc`` beside this file).

The runner is compiled on first use against the system Ceres (Debian: ``apt-get install -y
libceres-dev``) into a cache folder, ``$ARIADNE_CACHE/ceres_runner/<hash>/`` (default
``~/.cache/ariadne``), never into the repository; the hash covers the source and the compile
command, so an edited source is rebuilt. Problems travel through files (g2o for pose graphs, BAL
for bundle adjustment) and the runner answers with one JSON line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

SOURCE = Path(__file__).with_name("runner.cc")
INSTALL_HINT = "apt-get install -y libceres-dev"
_INCLUDE_DIRS = (Path("/usr/include"), Path("/usr/local/include"))
_TIMEOUT_S = 3600


class CeresUnavailable(RuntimeError):
    """Ceres is not installed, or the runner does not build."""


def cache_root() -> Path:
    """``$ARIADNE_CACHE`` or ``~/.cache/ariadne``."""
    return Path(os.environ.get("ARIADNE_CACHE", Path.home() / ".cache" / "ariadne"))


def _find_header(name: str) -> Path | None:
    for root in _INCLUDE_DIRS:
        if (root / name).exists():
            return root
    return None


def compile_command(output: Path) -> list[str]:
    """The compiler command line (``$CXX``, default ``g++``) that builds the runner."""
    cxx = os.environ.get("CXX", "g++")
    eigen = _find_header("eigen3/Eigen/Core")
    includes = [f"-I{eigen / 'eigen3'}"] if eigen is not None else []
    return [
        cxx,
        "-O3",
        "-DNDEBUG",
        "-std=c++17",
        *includes,
        str(SOURCE),
        "-o",
        str(output),
        "-lceres",
        "-lglog",
        "-lpthread",
    ]


def runner_path() -> Path:
    """Where the runner for the current source and compiler command lives (built or not)."""
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(" ".join(compile_command(Path("runner"))).encode())
    return cache_root() / "ceres_runner" / key.hexdigest()[:16] / "runner"


def build() -> Path:
    """The runner executable, compiled first if needed (about 10-20 s).

    Raises:
        CeresUnavailable: Ceres headers are missing or the compilation fails (with its output).
    """
    exe = runner_path()
    if exe.exists():
        return exe
    if _find_header("ceres/ceres.h") is None:
        raise CeresUnavailable(f"Ceres is not installed (install it with: {INSTALL_HINT})")
    if shutil.which(compile_command(exe)[0]) is None:
        raise CeresUnavailable(f"no C++ compiler {compile_command(exe)[0]!r} to build the runner")
    exe.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=exe.parent) as tmp:
        partial = Path(tmp) / "runner"
        done = subprocess.run(compile_command(partial), capture_output=True, text=True)
        if done.returncode != 0:
            raise CeresUnavailable(f"building the Ceres runner failed:\n{done.stderr[-3000:]}")
        os.replace(partial, exe)  # atomic: concurrent builders never see a partial file
    return exe


def available() -> tuple[bool, str]:
    """``(True, path)`` when the runner builds, else ``(False, reason)``."""
    try:
        return True, str(build())
    except CeresUnavailable as e:
        return False, str(e)


def solve_files(
    mode: Literal["pose_graph", "bal"],
    files: Sequence[str | os.PathLike[str]],
    *,
    max_iters: int = 100,
    threads: int = 0,
    prior_sqrt_info: float = 1e3,
) -> dict:
    """Solve the problems in ``files`` one after another.

    Returns the runner's JSON: ``time_s`` and costs summed over the files (Solve() only, no
    parsing), ``iterations`` (steps tried, accepted or not) the maximum, ``problems`` per file.
    ``threads=0``: all hardware threads.
    """
    cmd = [
        str(build()),
        mode,
        "--max-iters",
        str(max_iters),
        "--threads",
        str(threads),
        "--prior-sqrt-info",
        repr(float(prior_sqrt_info)),
        *map(str, files),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"Ceres runner failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])
