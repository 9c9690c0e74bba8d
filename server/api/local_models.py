"""Which local files a remote request may name as a model: only those under the roots the operator listed
(`--local-models DIR`); none by default.

A refusal says nothing about the path: not whether it exists, not what it is, not its size or its first bytes.
Every refused path gets the same answer, byte for byte, whatever the cause: outside the roots, a link out of
them (the path's own or one inside a diffusers folder), a name that changed while it was opened, a path that
cannot even be resolved (`/proc/1/root/...`), a device or a FIFO. Nothing a refused request named reaches the
model store, so nothing is registered or listed.

An accepted path is resolved once and opened along that resolution (`modelstore.local_files`), and the request
goes on naming the model by its real path: one model per real file, whatever spelling the client used
(`/proc/self/root/...`, `/proc/self/cwd/...`, `//`). The store opens that real path again without following
any link, so a name swapped for a link after this check is refused there, not followed, and it loads the
model from the files it opened and hashed, never by name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from google.protobuf.message import Message

from modelstore import LocalPathRefused, Source, open_model, parse_air
from modelstore.errors import InvalidModelId
from server.core.errors import FieldViolation, InvalidRequest

REFUSED = "local files are not served to remote requests (see the server's --local-models)"


def canonical(text: str, roots: Sequence[Path]) -> str | None:
    """What the request should name instead of `text`: `text` itself for any AIR that is not a local path (a
    malformed AIR too: validation reports it with its own message), `local:<real path>` for a local model
    under one of `roots` that opens safely; None when it is refused."""
    try:
        air = parse_air(text)
    except InvalidModelId:
        return text
    if air.source is not Source.LOCAL:
        return text
    if not roots:
        return None
    try:
        with open_model(air.id, roots, confined=True) as opened:
            return f"local:{opened.path}"
    except (LocalPathRefused, OSError):
        return None


def canonicalize(request: Message, fields: Sequence[str], roots: Sequence[Path]) -> None:
    """Refuse the request (InvalidRequest) if any of its `fields` (dotted paths: "refiner.model") names a local
    model outside `roots`; else make each local model they name its real path, in place: what the store is
    given is what was checked here."""
    if violations := refusals(request, fields, roots):
        raise InvalidRequest(violations)


def refusals(request: Message, fields: Sequence[str], roots: Sequence[Path]) -> list[FieldViolation]:
    """`canonicalize`, returning the refused fields instead of raising: for validation that names every bad
    field of a request at once (the accepted ones are rewritten in place all the same)."""
    found: dict[str, str | None] = {}
    for field in fields:
        text = _get(request, field)
        if text:
            found[field] = canonical(text, roots)
    for field, value in found.items():
        if value is not None and value != _get(request, field):
            _set(request, field, value)
    return _violations([field for field, value in found.items() if value is None])


def _violations(fields: Sequence[str]) -> list[FieldViolation]:
    return [FieldViolation(field, REFUSED, "LOCAL_MODEL_REFUSED") for field in fields]


def _get(request: Message, field: str) -> str:
    value: object = request
    for name in field.split("."):
        value = _child(value, name)
    return str(value)


def _set(request: Message, field: str, text: str) -> None:
    *parents, name = field.split(".")
    target: object = request
    for parent in parents:
        target = _child(target, parent)
    setattr(target, name, text)


def _child(message: object, name: str) -> object:
    """`name` of `message`, where a name may index a repeated field: "loras[1]"."""
    found = _INDEXED.fullmatch(name)
    if found is None:
        return getattr(message, name)
    return getattr(message, found[1])[int(found[2])]


_INDEXED = re.compile(r"(\w+)\[(\d+)\]")
