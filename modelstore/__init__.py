"""Refinery's model store: AIR identifiers, sources, the verified content-addressed cache, safe loading.

It knows nothing of gRPC; errors are the `modelstore.errors` tree.
"""

from modelstore.air import AIR, Source, parse_air
from modelstore.record import Architecture, Layout, ModelRecord
from modelstore.settings import StoreSettings
from modelstore.store import ModelStore, require_role

__all__ = [
    "AIR",
    "Architecture",
    "Layout",
    "ModelRecord",
    "ModelStore",
    "Source",
    "StoreSettings",
    "parse_air",
    "require_role",
]
