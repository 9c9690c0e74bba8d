"""Which local files a remote request may name as a model: only those under the roots the operator listed
(`--local-models DIR`); none by default.

A refusal says nothing about the path: not whether it exists, not what it is, not its size or its first bytes.
The check looks only at where the path leads (symlinks resolved), never at the file, and every refused path
gets the same answer, byte for byte. Nothing a refused request named reaches the model store, so nothing is
registered or listed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from modelstore import Source, parse_air
from modelstore.errors import InvalidModelId
from server.core.errors import FieldViolation, InvalidRequest

REFUSED = "local files are not served to remote requests (see the server's --local-models)"


def allowed(text: str, roots: Sequence[Path]) -> bool:
    """Whether `text` may be used: any AIR that is not a local path, or a local path under one of `roots`.
    A malformed AIR is allowed here: validation reports it with its own message."""
    try:
        air = parse_air(text)
    except InvalidModelId:
        return True
    if air.source is not Source.LOCAL:
        return True
    target = os.path.realpath(air.id)
    for root in roots:
        base = os.path.realpath(root)
        if target == base or target.startswith(base.rstrip(os.sep) + os.sep):
            return True
    return False


def check(fields: Sequence[tuple[str, str]], roots: Sequence[Path]) -> None:
    """Raise InvalidRequest naming every (field, text) that names a local file outside `roots`."""
    refused = [
        FieldViolation(field, REFUSED, "LOCAL_MODEL_REFUSED")
        for field, text in fields
        if text and not allowed(text, roots)
    ]
    if refused:
        raise InvalidRequest(refused)
