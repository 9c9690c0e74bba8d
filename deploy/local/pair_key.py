"""The pair-affinity header: `refinery-pair: <model>+<refiner>`, from the request's own model strings.

A balancer hashes this value to pick a replica, so every request for one base+refiner pair reaches the replica
that already holds that pair in memory. The rule is the same in every client language (Python, Go, Java,
TypeScript): the request's `model` and `refiner.model` as written (empty for unset, so a request that relies on
the server's defaults sends `+`), joined by `+`, percent-encoded so the value is plain ASCII whatever a local
path holds. The balancer never parses it: two spellings of one model just hash apart, which costs a load, never
a wrong answer.
"""

from __future__ import annotations

from urllib.parse import quote

from refinery.v1 import generation_pb2 as pb

PAIR_HEADER = "refinery-pair"
# Characters AIRs are made of (`civitai:101055@128078+126002`, `hf:owner/repo`) stay readable in logs.
_SAFE = ":@+/._-~"


def pair_key(model: str, refiner: str) -> str:
    """The header value for a base model and a refiner model, as the request names them ("" for unset)."""
    return quote(f"{model}+{refiner}", safe=_SAFE)


def request_pair_key(request: pb.GenerateRequest) -> str:
    """The header value for `request`: its own `model` and `refiner.model` strings."""
    refiner = request.refiner.model if request.HasField("refiner") else ""
    return pair_key(request.model, refiner)
