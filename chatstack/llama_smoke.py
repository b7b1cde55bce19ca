"""Set-up's last check: can this host's llama.cpp build load a GGUF and generate?

`python -m chatstack.llama_smoke MODEL.gguf` loads the model and generates a few tokens in
a child process, so a build that crashes (a signal, not an exception) is reported with
its likely cause and fix instead of killing every TorchServe worker later with
"Worker died.".
"""

from __future__ import annotations

import signal
import subprocess
import sys

GENERATE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_batch=64, verbose=False)
out = llm.create_completion("The capital of France is", max_tokens=4, temperature=0)
print(repr(out["choices"][0]["text"]))
"""

FIXES = {
    signal.SIGSEGV: "a general protection fault is what llama.cpp's AMX kernels do on Intel Xeons with AMX "
                    "(llama.cpp PR #26954); setup.sh builds without AMX: check that LLAMA_CMAKE_ARGS "
                    "is unset or keeps -mno-amx-tile -mno-amx-int8 -mno-amx-bf16, then rerun ./setup.sh",
    signal.SIGILL: "the library uses an instruction this CPU lacks: it was built on or for another CPU "
                   "(a copied .venv or pip wheel); rerun ./setup.sh on this machine, which builds for it",
    signal.SIGBUS: "the model file is truncated or on a failing disk: delete it and rerun ./setup.sh",
}


def explain(returncode: int) -> str:
    """Words for a child's exit status: the signal that killed it, and what to do."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    sig = signal.Signals(-returncode)
    fix = FIXES.get(sig, "see the error above")
    return f"killed by signal {-returncode} ({sig.name}): {fix}"


def check(model_path: str, timeout_s: float = 300) -> tuple[bool, str]:
    done = subprocess.run([sys.executable, "-c", GENERATE, model_path],
                          capture_output=True, text=True, timeout=timeout_s)
    if done.returncode == 0 and done.stdout.strip():
        return True, done.stdout.strip()
    return False, f"{explain(done.returncode)}\n{done.stderr[-2000:]}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m chatstack.llama_smoke MODEL.gguf", file=sys.stderr)
        return 2
    ok, detail = check(args[0])
    if ok:
        print(f"llama.cpp generates on this host: {detail}")
        return 0
    print(f"llama.cpp cannot generate on this host: {detail}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
