"""Who may make the store download, and who did (issue 21, item 2).

Downloads cost disk (an SDXL checkpoint is about 7 GB) and bandwidth, so they are the operator's decision:

- `Cause` says who wants a model: a request that named it (`REQUEST`, on demand), an operator's pull
  (`PULL`, the default for every caller of the store that is not a server's request) or a pin (`PIN`). The
  store logs it with each download ("downloading X ... for request r-17") and counts downloads per cause.
- `OnDemandPolicy` is what requests may download: `none` (only models already cached, pulled or pinned),
  `any`, or a list of AIR patterns (`civitai:101055@*`, `huggingface:stabilityai/*`: shell-style, matched
  against the canonical AIR). Built-in and local models are not downloads and are never refused by it.

Whatever the policy, a download for a request evicts only models that requests downloaded (never one an
operator pulled or pinned), leaves a free-space floor on the cache's disk, and a model it brought in that no
role can use is removed again (`store.py`).
"""

from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass

from modelstore.air import AIR, Source

__all__ = [
    "ANY_DOWNLOAD",
    "DEFAULT_MIN_FREE_BYTES",
    "NO_DOWNLOADS",
    "PIN",
    "PULL",
    "Cause",
    "DownloadCause",
    "OnDemandPolicy",
]

# What a download for a request leaves free on the cache's disk: a full disk stops more than downloads (the
# index, the compile cache, the logs), and about one SDXL checkpoint of slack keeps an operator's next pull
# possible.
DEFAULT_MIN_FREE_BYTES = 8 * 1024**3
_REMOTE = (Source.CIVITAI, Source.HUGGINGFACE)


class Cause(enum.Enum):
    REQUEST = "request"
    PULL = "pull"
    PIN = "pin"


@dataclass(frozen=True)
class DownloadCause:
    """Who wants a model fetched: a cause, and for a request its id (already made safe to log by the caller)."""

    cause: Cause
    request_id: str = ""

    @classmethod
    def request(cls, request_id: str) -> DownloadCause:
        return cls(Cause.REQUEST, request_id)

    @property
    def on_demand(self) -> bool:
        return self.cause is Cause.REQUEST

    def __str__(self) -> str:
        if self.cause is Cause.REQUEST:
            return f"request {self.request_id}" if self.request_id else "a request"
        return f"a {self.cause.value}"


PULL = DownloadCause(Cause.PULL)
PIN = DownloadCause(Cause.PIN)


@dataclass(frozen=True)
class OnDemandPolicy:
    """AIR patterns requests may download; `()` is none, `("*",)` any."""

    patterns: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> OnDemandPolicy:
        """`none` (or empty), `any`, or patterns separated by commas or spaces; ValueError for a pattern that
        names no remote source (civitai:, huggingface:)."""
        words = text.replace(",", " ").split()
        if not words or words == ["none"]:
            return cls(())
        if words == ["any"]:
            return cls(("*",))
        for word in words:
            scheme = word.partition(":")[0]
            if scheme not in {s.value for s in _REMOTE}:
                raise ValueError(
                    f"{word!r} is not an AIR pattern of a source that downloads (civitai:..., huggingface:...); "
                    "expected none, any, or patterns such as civitai:101055@*"
                )
        return cls(tuple(words))

    def allows(self, air: AIR) -> bool:
        if air.source not in _REMOTE:
            return True
        return any(fnmatch.fnmatchcase(air.canonical, pattern) for pattern in self.patterns)

    def __str__(self) -> str:
        if not self.patterns:
            return "none"
        return "any" if self.patterns == ("*",) else ",".join(self.patterns)


# The default: requests download nothing; only an operator decides what fills the disk.
NO_DOWNLOADS = OnDemandPolicy(())
ANY_DOWNLOAD = OnDemandPolicy(("*",))
