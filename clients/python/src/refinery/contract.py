"""The contract's `.proto` files, shipped inside this package for code generators in other languages.

`proto/` in the repository is a buf module: `refinery/v1/*.proto` and the `google/rpc` protos it needs for error
details (vendored, so that `BadRequest` and `RetryInfo` decode without fetching anything). scripts/gen_proto.py
copies the module into `refinery/proto/` of this package, so what a team installed is exactly what it can
generate a Go, TypeScript or Ruby client from:

    from refinery.contract import write_protos
    write_protos(Path("proto"))   # then: buf generate proto, protoc -I proto ..., grpc_tools_ruby_protoc ...
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath


def proto_files() -> dict[PurePosixPath, bytes]:
    """Every shipped `.proto` file by its import path (`refinery/v1/generation.proto`, `google/rpc/status.proto`)."""
    found: dict[PurePosixPath, bytes] = {}

    def walk(folder: Traversable, prefix: PurePosixPath) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, prefix / entry.name)
            elif entry.name.endswith(".proto"):
                found[prefix / entry.name] = entry.read_bytes()

    walk(files("refinery") / "proto", PurePosixPath())
    return dict(sorted(found.items()))


def write_protos(directory: Path) -> list[Path]:
    """Write the contract's `.proto` files under `directory` in their import layout (replacing files of the same
    names, leaving others alone); returns the files written. `directory` is then an include root for protoc
    (`-I directory`) or a buf module (`buf generate directory`)."""
    written = []
    for name, content in proto_files().items():
        path = directory.joinpath(*name.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        written.append(path)
    return written
