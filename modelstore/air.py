"""AIR identifiers: parsing and the canonical form.

Accepted forms (shared/research/modelstore.md §1):

- short:  ``civitai:101055@128080``, ``civitai:101055@128080+98765`` (a pinned file id)
- URN:    ``urn:air:{ecosystem}:{type}:{source}:{id}[@version][+fileId][.format]``; ``urn:`` and ``air:`` are
  optional, and so are ecosystem and type
- Hugging Face: ``huggingface:stabilityai/stable-diffusion-xl-base-1.0[@revision][+path/in/repo.safetensors]``,
  alias ``hf:``. Repo names keep their dots; ``+path`` picks one single-file checkpoint in the repo.
- built-in:  ``builtin:tiny-sdxl-base@1``
- local:  ``local:/abs/path`` or a bare absolute path (a diffusers folder or a .safetensors file)

The type an URN states must fit where the AIR is used: `parse_air` takes checkpoints (a model, refiner or not),
`parse_lora_air` LoRAs, and `parse_stored_air` either (what an operator pulls, lists, pins, verifies or deletes);
an AIR without a type may be either, and the weights themselves decide (`ModelRecord.kind`). Every other type
(vae, embedding, ...) is refused everywhere.

civitai's published regexes mangle dotted repo names and ``+fileId`` (modelstore.md §1.4), so this is an explicit
parser. `AIR.canonical` is the short form; parsing it gives back an equal AIR, which is what caches key on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import PurePosixPath

from modelstore.errors import InvalidModelId


class Source(Enum):
    CIVITAI = "civitai"
    HUGGINGFACE = "huggingface"
    BUILTIN = "builtin"
    LOCAL = "local"


_SOURCE_ALIASES = {
    "civitai": Source.CIVITAI,
    "huggingface": Source.HUGGINGFACE,
    "hf": Source.HUGGINGFACE,
    "builtin": Source.BUILTIN,
    "local": Source.LOCAL,
}
# Types that name a whole checkpoint; anything else (lora, vae, embedding, ...) cannot be used as a model.
_CHECKPOINT_TYPES = frozenset({"checkpoint", "model"})
_LORA_TYPES = frozenset({"lora"})
_KNOWN_TYPES = _CHECKPOINT_TYPES | {
    "lora",
    "embedding",
    "vae",
    "controlnet",
    "upscaler",
    "diffusionmodel",
    "unet",
    "hypernet",
    "ag",
    "motion",
    "dora",
    "lycoris",
    "text_encoders",
    "clipvision",
    "clip",
    "visionlanguage",
    "other",
    "unknown",
}
# Only safetensors are ever loaded; "diffuser(s)" is a folder of safetensors.
_FORMATS = {
    "safetensor": "safetensor",
    "safetensors": "safetensor",
    "diffuser": "diffusers",
    "diffusers": "diffusers",
}
_REFUSED_FORMATS = {"ckpt", "pt", "pth", "bin", "pickle", "pickletensor", "gguf", "onnx"}

_DIGITS = re.compile(r"[0-9]{1,19}")
_SEGMENT = re.compile(r"[a-z0-9][a-z0-9_\-]*")
_HF_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}")
_HF_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]{0,127}")
_BUILTIN_NAME = re.compile(r"[a-z0-9][a-z0-9\-]{0,63}")
_BUILTIN_VERSION = re.compile(r"[0-9]{1,6}")


@dataclass(frozen=True, eq=False)
class AIR:
    """A parsed model identifier, known by its `canonical` form.

    Two AIRs are equal, and hash alike, when their canonical forms are: `urn:air:sdxl:checkpoint:civitai:1@2`
    and `civitai:1@2` name one model (what the URN adds, ecosystem, type and format, is checked at parsing and
    is not part of the identity), so pairs, batches and caches keyed by AIRs group them together. An AIR also
    equals its canonical text, as `Role` equals its value: the canonical text is what records, logs and the
    wire carry."""

    source: Source
    id: str
    version: str | None = None
    file: str | None = None
    ecosystem: str | None = None
    type: str | None = None
    format: str | None = None

    @property
    def canonical(self) -> str:
        if self.source is Source.LOCAL:
            return f"local:{self.id}"
        text = f"{self.source.value}:{self.id}"
        if self.version is not None:
            text += f"@{self.version}"
        if self.file is not None:
            text += f"+{self.file}"
        return text

    def __str__(self) -> str:
        return self.canonical

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AIR):
            return self.canonical == other.canonical
        if isinstance(other, str):
            return self.canonical == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.canonical)


def parse_air(text: str) -> AIR:
    """Parse a checkpoint's AIR, a built-in name or a local path; raise InvalidModelId saying what is wrong (its
    `air` is `text` as given), e.g. for an URN typed `lora` ("... is a lora, not a checkpoint")."""
    return _parsed(text, _CHECKPOINT_TYPES, "checkpoint")


def parse_lora_air(text: str) -> AIR:
    """Parse a LoRA's AIR (as `parse_air`); an URN typed `checkpoint` (or anything but `lora`) is InvalidModelId."""
    return _parsed(text, _LORA_TYPES, "LoRA")


def parse_stored_air(text: str) -> AIR:
    """Parse the AIR of anything the store keeps, a checkpoint or a LoRA (the operators' calls)."""
    return _parsed(text, _CHECKPOINT_TYPES | _LORA_TYPES, "checkpoint or a LoRA")


def _parsed(text: str, types: frozenset[str], wanted: str) -> AIR:
    try:
        return _parse(text, types, wanted)
    except InvalidModelId as exc:
        raise exc.about(text) from None


def _parse(text: str, types: frozenset[str], wanted: str) -> AIR:
    if not text:
        raise InvalidModelId("model identifier is empty")
    if text != text.strip() or any(c.isspace() or ord(c) < 32 for c in text):
        raise InvalidModelId(f"model identifier {text!r} contains whitespace or control characters")
    if len(text) > 1024:
        raise InvalidModelId("model identifier is longer than 1024 characters")
    if text.startswith("/"):
        return _local(text)
    lowered = text.lower()
    if lowered.startswith("local:"):
        return _local(text[len("local:") :])

    body = text
    for prefix in ("urn:", "air:"):
        if body.lower().startswith(prefix):
            body = body[len(prefix) :]
    head, sep, tail = body.partition("@")
    segments = head.split(":")
    if len(segments) < 2:
        raise InvalidModelId(f"{text!r} is not an AIR: expected source:id (e.g. civitai:101055@128080)")
    source_name, model_id = segments[-2].lower(), segments[-1]
    qualifiers = [s.lower() for s in segments[:-2]]
    source = _SOURCE_ALIASES.get(source_name)
    if source is None:
        known = ", ".join(sorted(_SOURCE_ALIASES))
        raise InvalidModelId(f"{text!r}: unsupported source {source_name!r} (supported: {known})")
    ecosystem, model_type = _qualifiers(text, qualifiers)
    if model_type is not None and model_type not in types:
        raise InvalidModelId(f"{text!r} is a {model_type}, not a {wanted}")

    version: str | None = None
    file: str | None = None
    fmt: str | None = None
    if source is Source.HUGGINGFACE:
        if sep:
            version, file = _split_plus(tail)
        else:
            model_id, file = _split_plus(model_id)
        if version is not None and version == "":
            raise InvalidModelId(f"{text!r}: empty revision after '@'")
    else:
        if sep:
            version, file = _split_plus(tail)
            if file is not None:
                file, fmt = _split_format(text, file)
            else:
                version, fmt = _split_format(text, version)
        else:
            model_id, fmt = _split_format(text, model_id)
    return _validated(text, AIR(source, model_id, version, file, ecosystem, model_type, fmt))


def _local(path: str) -> AIR:
    if not path.startswith("/"):
        raise InvalidModelId(f"local model path {path!r} must be absolute")
    parts = PurePosixPath(path).parts
    if ".." in parts:
        raise InvalidModelId(f"local model path {path!r} must not contain '..'")
    normalised = str(PurePosixPath(path))
    return AIR(Source.LOCAL, normalised)


def _qualifiers(text: str, qualifiers: list[str]) -> tuple[str | None, str | None]:
    if len(qualifiers) > 2:
        raise InvalidModelId(f"{text!r}: too many ':' segments for an AIR")
    for q in qualifiers:
        if not _SEGMENT.fullmatch(q):
            raise InvalidModelId(f"{text!r}: malformed AIR segment {q!r}")
    if len(qualifiers) == 2:
        return qualifiers[0], qualifiers[1]
    if len(qualifiers) == 1:
        # One qualifier is a type if it names one (urn:air:model:huggingface:...), else an ecosystem.
        return (None, qualifiers[0]) if qualifiers[0] in _KNOWN_TYPES else (qualifiers[0], None)
    return None, None


def _split_plus(text: str) -> tuple[str, str | None]:
    value, plus, rest = text.partition("+")
    return value, (rest if plus else None)


def _split_format(text: str, value: str) -> tuple[str, str | None]:
    stem, dot, suffix = value.rpartition(".")
    if not dot:
        return value, None
    suffix = suffix.lower()
    if suffix in _REFUSED_FORMATS:
        raise InvalidModelId(f"{text!r}: format {suffix!r} is refused; only safetensors are loaded")
    if suffix not in _FORMATS:
        raise InvalidModelId(f"{text!r}: unknown format {suffix!r}")
    return stem, _FORMATS[suffix]


def _validated(text: str, air: AIR) -> AIR:
    if air.source is Source.CIVITAI:
        if not _DIGITS.fullmatch(air.id):
            raise InvalidModelId(f"{text!r}: a civitai model id is a number")
        if air.version is None or not _DIGITS.fullmatch(air.version):
            raise InvalidModelId(f"{text!r}: a civitai AIR needs a numeric version (civitai:MODEL@VERSION)")
        if air.file is not None and not _DIGITS.fullmatch(air.file):
            raise InvalidModelId(f"{text!r}: a civitai file id (+FILE) is a number")
    elif air.source is Source.HUGGINGFACE:
        if not _HF_REPO.fullmatch(air.id) or ".." in air.id:
            raise InvalidModelId(f"{text!r}: a Hugging Face id is owner/repo")
        if air.version is not None and (not _HF_REVISION.fullmatch(air.version) or ".." in air.version):
            raise InvalidModelId(f"{text!r}: malformed revision {air.version!r}")
        if air.file is not None:
            path = PurePosixPath(air.file)
            if (
                not air.file
                or path.is_absolute()
                or ".." in path.parts
                or "\\" in air.file
                or not air.file.endswith(".safetensors")
            ):
                raise InvalidModelId(f"{text!r}: +FILE must be a relative .safetensors path inside the repo")
    elif air.source is Source.BUILTIN:
        if not _BUILTIN_NAME.fullmatch(air.id):
            raise InvalidModelId(f"{text!r}: malformed built-in model name")
        if air.version is None or not _BUILTIN_VERSION.fullmatch(air.version) or air.file is not None:
            raise InvalidModelId(f"{text!r}: a built-in model is builtin:NAME@VERSION")
    return air
