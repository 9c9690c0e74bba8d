"""Refinery's model store: AIR identifiers, sources, the verified content-addressed cache, safe loading.

`ModelStore` is the front door, and this module exports everything a caller needs. It knows nothing of gRPC;
errors are the `modelstore.errors` tree. Public modules: `air`, `errors`, `record`, `settings`, `store`,
`loading`, `progress`, `components`, `role`, `role_policy`, `downloads` and `units`; modules whose names start
with an underscore (and the `_sources` package) are internal and change without notice.
"""

from modelstore.air import AIR, Source, parse_air, parse_lora_air, parse_stored_air
from modelstore.components import Component
from modelstore.downloads import Cause, DownloadCause, OnDemandPolicy
from modelstore.errors import NotALora
from modelstore.loading import Loader, load_pipeline, native_size, preferred_dtype
from modelstore.local_files import LocalPathRefused, folders_read, open_model
from modelstore.progress import DownloadProgress, ProgressCallback
from modelstore.record import Architecture, CachedModel, Layout, ModelKind, ModelRecord, Verdict, Verification
from modelstore.role import Role
from modelstore.role_policy import ROLE_ARCHITECTURES, needs_mask, require_lora, require_role
from modelstore.settings import StoreSettings
from modelstore.store import ModelStore


def downloaded_bytes() -> int:
    """Bytes this process has received from model sources (civitai, its storage hosts), for metrics."""
    from modelstore._http import RECEIVED

    return RECEIVED.total


__all__ = [
    "AIR",
    "ROLE_ARCHITECTURES",
    "Architecture",
    "CachedModel",
    "Cause",
    "Component",
    "DownloadCause",
    "DownloadProgress",
    "Layout",
    "Loader",
    "LocalPathRefused",
    "ModelKind",
    "ModelRecord",
    "ModelStore",
    "NotALora",
    "OnDemandPolicy",
    "ProgressCallback",
    "Role",
    "Source",
    "StoreSettings",
    "Verdict",
    "Verification",
    "downloaded_bytes",
    "folders_read",
    "load_pipeline",
    "native_size",
    "needs_mask",
    "open_model",
    "parse_air",
    "parse_lora_air",
    "parse_stored_air",
    "preferred_dtype",
    "require_lora",
    "require_role",
]
