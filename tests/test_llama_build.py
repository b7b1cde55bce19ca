"""The llama.cpp that setup.sh built runs on this host and on hosts with AMX.

llama.cpp's AMX kernels crash workers on Intel Xeons with AMX (a general protection fault
at the first tile instruction), so setup.sh builds without them. Checking the library's
code, not this CPU, catches a regression on a machine without AMX too.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest

from chatstack import llama_smoke

AMX_INSTRUCTIONS = re.compile(r"\b(ldtilecfg|sttilecfg|tileloadd|tileloaddt1|tilestored|tilezero|tilerelease|"
                              r"tdpb[su][su]d|tdpbf16ps|tdpfp16ps)\b")


def ggml_cpu_libraries() -> list[Path]:
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    return sorted(lib_dir.glob("libggml-cpu*.so*"))


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_the_built_cpu_backend_has_no_amx_tile_instructions():
    libraries = ggml_cpu_libraries()
    assert libraries, "no libggml-cpu library in the installed llama_cpp package"
    for library in libraries:
        listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)],
                                 capture_output=True, text=True, check=True).stdout
        assert len(listing) > 100_000, f"objdump printed almost nothing for {library}"
        found = sorted(set(AMX_INSTRUCTIONS.findall(listing)))
        assert not found, f"{library.name} holds AMX instructions {found}: build with -mno-amx-* (setup.sh)"


def test_the_smoke_check_generates_with_the_default_model(default_gguf):
    ok, detail = llama_smoke.check(str(default_gguf))
    assert ok, detail
    assert detail.strip("'\"")   # some text came back


def test_the_smoke_check_names_the_signal_that_killed_the_child_and_the_fix():
    assert "SIGSEGV" in llama_smoke.explain(-signal.SIGSEGV) and "AMX" in llama_smoke.explain(-signal.SIGSEGV)
    assert "setup.sh" in llama_smoke.explain(-signal.SIGILL)
    # A child that really dies by a signal is reported as such.
    done = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    assert "signal 11 (SIGSEGV)" in llama_smoke.explain(done.returncode)
