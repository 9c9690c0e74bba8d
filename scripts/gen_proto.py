"""Generate the Python code for `proto/refinery/` and ship the contract in the client package.

    python scripts/gen_proto.py           # regenerate
    python scripts/gen_proto.py --check   # exit 1 if what is committed is stale (a test runs this)

Two things land in the `refinery` package of `clients/python` (the refinery-client distribution):
- `refinery/v1/`: protobuf and gRPC code for `proto/refinery/v1/*.proto`;
- `refinery/proto/`: a copy of every `.proto` file of the buf module `proto/`, the vendored `google/rpc` ones
  included, so that an installed package can hand its contract to code generators in other languages
  (`refinery.contract.write_protos`).
The vendored `google/rpc` protos are copied but never compiled: Python gets `google.rpc` from
googleapis-common-protos, and a second copy of those modules would clash with it.

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
PACKAGE = ROOT / "clients" / "python" / "src" / "refinery"
# What this script owns inside the package; everything else there (the client) is written by hand.
OWNED = ("v1", "proto")
INIT_TEXT = '"""Generated from proto/refinery/v1 by scripts/gen_proto.py; do not edit."""\n'


def generate(package: Path) -> None:
    """Write the owned parts of the `refinery` package into `package` (a folder named like the package)."""
    import grpc_tools  # the bundled protoc and the well-known types ship with grpcio-tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    ours = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "refinery").rglob("*.proto"))
    out_root = package.parent
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *ours,
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_ROOT)
    (package / "v1" / "__init__.py").write_text(INIT_TEXT)
    for proto in PROTO_ROOT.rglob("*.proto"):
        copy = package / "proto" / proto.relative_to(PROTO_ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(proto, copy)


def _tree(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p
        for part in OWNED
        if (root / part).exists()
        for p in (root / part).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the package differs from a fresh generation")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh_package = Path(tmp) / "refinery"
        fresh_package.mkdir()
        generate(fresh_package)
        fresh = _tree(fresh_package)
        if args.check:
            current = _tree(PACKAGE)
            stale = sorted(
                name
                for name in fresh.keys() | current.keys()
                if name not in fresh
                or name not in current
                or not filecmp.cmp(fresh[name], current[name], shallow=False)
            )
            if stale:
                print("generated code or shipped protos are stale; run: python scripts/gen_proto.py", file=sys.stderr)
                for name in stale:
                    print(f"  {(PACKAGE / name).relative_to(ROOT)}", file=sys.stderr)
                return 1
            return 0
        for part in OWNED:
            if (PACKAGE / part).exists():
                shutil.rmtree(PACKAGE / part)
            shutil.copytree(fresh_package / part, PACKAGE / part)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
