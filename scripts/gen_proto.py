"""Generate the Python protobuf and gRPC code for `proto/refinery/v1/` into `refinery/v1/`.

    python scripts/gen_proto.py           # regenerate
    python scripts/gen_proto.py --check   # exit 1 if the committed code is stale (a test runs this)

The generated code is committed so that `pip install` needs no protoc; the pinned grpcio-tools version
(pyproject's dev extra) keeps the output byte-stable, which is what makes the staleness check meaningful.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_PACKAGE = ROOT / "refinery"
INIT_TEXT = '"""Generated from proto/refinery/v1 by scripts/gen_proto.py; do not edit."""\n'


def generate(out_root: Path) -> None:
    import grpc_tools  # the bundled protoc and the well-known types ship with grpcio-tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_ROOT)
    for package in (out_root / "refinery", out_root / "refinery" / "v1"):
        (package / "__init__.py").write_text(INIT_TEXT)


def _tree(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if refinery/ differs from a fresh generation")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = _tree(Path(tmp) / "refinery")
        if args.check:
            current = _tree(OUT_PACKAGE) if OUT_PACKAGE.exists() else {}
            stale = sorted(
                name
                for name in fresh.keys() | current.keys()
                if name not in fresh
                or name not in current
                or not filecmp.cmp(fresh[name], current[name], shallow=False)
            )
            if stale:
                print("generated protobuf code is stale; run: python scripts/gen_proto.py", file=sys.stderr)
                for name in stale:
                    print(f"  refinery/{name}", file=sys.stderr)
                return 1
            return 0
        if OUT_PACKAGE.exists():
            shutil.rmtree(OUT_PACKAGE)
        shutil.copytree(Path(tmp) / "refinery", OUT_PACKAGE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
