"""What a test can see of a cache folder from outside: the files that would be loaded, or resumed."""

from __future__ import annotations

from pathlib import Path


def blob_files(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "blobs").rglob("*") if p.is_file())


def partial_files(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "partial").glob("*.part"))


def model_files(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "models").rglob("*") if not p.is_dir())
