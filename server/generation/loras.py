"""LoRAs applied to a stage's pipeline for one batch, as unfused PEFT adapters (diffusers' own LoRA loading).

How, and why this way:

- Each LoRA file is loaded onto a pipeline once, with diffusers' `load_lora_weights` (which reads the kohya /
  AUTOMATIC1111 and diffusers / PEFT formats, UNet and text-encoder parts), under its content digest as the
  adapter's name; a batch then activates its stage's set with its weights on each component (UNet and text
  encoders) that has them and disables the adapters everywhere else. That is exactly what a hand-run
  `load_lora_weights` + `set_adapters(names, weights)` computes, so a request's image equals it.
- Unfused rather than fused into the weights: fusing per batch and restoring afterwards would cost a copy of
  every touched weight (and subtracting a fused delta back does not restore fp16 weights exactly), while an
  unfused adapter costs a rank-r product per layer and switching sets costs nothing but flags.
- A batch without LoRAs disables the adapters: PEFT's layers then return their base layer's output as is, so
  such a request's image is the one it had before any LoRA was loaded.
- Compiled UNets (`compiling.UNetDispatch`): their graphs were traced without adapter layers, so a LoRA batch
  runs the UNet eagerly through the dispatch's run-only path (a guard that fails costs an eager step, never a
  compile on the worker's thread), and a LoRA-free batch on a UNet that holds adapters unloads them first, so
  the compiled graphs serve it again. Switching LoRA sets therefore never recompiles anything.
- Bounds: at most `MAX_ADAPTERS` adapters stay loaded per pipeline (least recently used deleted first), and
  the files' tensors stay in host memory up to `HOST_CACHE_BYTES` (least recently used dropped first), so a
  LoRA used again after its adapter was deleted is not read from disk again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.core.domain import LoraSpec
from server.core.errors import DoesNotFit

if TYPE_CHECKING:  # torch and diffusers load only where a LoRA is applied: this module's values travel light
    import torch

log = logging.getLogger(__name__)

MAX_ADAPTERS = 8  # per pipeline: twice a stage's own limit, so alternating two full sets never reloads
HOST_CACHE_BYTES = 1 << 30
# A LoRA is refused unless this share of the modules it names exist in the stage's models: never applied
# partly in silence. (Real files carry a few keys diffusers drops on purpose, e.g. kohya's text-projection
# extras, so "all" would refuse working LoRAs.)
MIN_MATCHED = 0.9
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FP8_MARK = "_refinery_fp8"  # set on a UNet whose linear layers `tuning` made FP8


@dataclass(frozen=True)
class LoraFile:
    """A LoRA resolved for one stage: what was asked, the cached file, its digest and the request field that
    named it (for a refusal)."""

    spec: LoraSpec
    path: Path
    digest: str
    field: str

    @property
    def adapter(self) -> str:
        return f"lora_{self.digest[:16]}"


@dataclass(frozen=True)
class StageLoras:
    """The LoRA files of both stages of a batch (equal for every request in it)."""

    base: tuple[LoraFile, ...] = ()
    refiner: tuple[LoraFile, ...] = ()


class _HostCache:
    """Files' tensors in host memory, least recently used dropped first beyond `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._items: OrderedDict[str, tuple[dict[str, torch.Tensor], int]] = OrderedDict()

    def get(self, file: LoraFile) -> dict[str, torch.Tensor]:
        with self._lock:
            found = self._items.get(file.digest)
            if found is not None:
                self._items.move_to_end(file.digest)
                return found[0]
        from safetensors.torch import load_file

        tensors = load_file(str(file.path), device="cpu")
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        with self._lock:
            self._items[file.digest] = (tensors, size)
            while sum(s for _, s in self._items.values()) > self._limit and len(self._items) > 1:
                self._items.popitem(last=False)
        return tensors


_HOST = _HostCache(HOST_CACHE_BYTES)
# Adapters loaded on each UNet, least recently used first (a pipeline is rebuilt per run; its UNet is not).
_LOADED: weakref.WeakKeyDictionary[Any, OrderedDict[str, None]] = weakref.WeakKeyDictionary()


def apply(pipe: Any, files: Sequence[LoraFile]) -> None:
    """Make `pipe` compute with exactly `files` at their weights (none: with no LoRA at all)."""
    if files and (reason := _untunable(pipe.unet)):
        raise DoesNotFit(f"{files[0].spec.model} cannot be applied: {reason}", files[0].field)
    loaded = _LOADED.setdefault(pipe.unet, OrderedDict())
    if not files:
        if loaded and _compiled(pipe.unet):
            # The compiled graphs know no adapter layers. The UNet's alone: text encoders are not compiled, and
            # one may be shared with the other stage, whose adapters it also holds.
            pipe.unet.unload_lora()
            loaded.clear()
        _enable(pipe, [], [])
        return
    for file in files:
        if file.adapter in loaded:
            loaded.move_to_end(file.adapter)
        else:
            _load(pipe, file, loaded)
    _enable(pipe, [f.adapter for f in files], [f.spec.weight for f in files])


def _load(pipe: Any, file: LoraFile, loaded: OrderedDict[str, None]) -> None:
    while len(loaded) >= MAX_ADAPTERS:
        oldest, _ = loaded.popitem(last=False)
        _forget(pipe, oldest)
    tensors = _HOST.get(file)
    _forget(pipe, file.adapter)  # what a text encoder may still hold of it after the UNet's were unloaded
    try:
        with _peft_quiet():
            # A copy: diffusers' format conversion pops keys from the dict it is given.
            pipe.load_lora_weights(dict(tensors), adapter_name=file.adapter)
    except (ValueError, KeyError, RuntimeError) as exc:
        _forget(pipe, file.adapter)
        raise DoesNotFit(f"{file.spec.model} does not fit this stage's models: {exc}", file.field) from exc
    matched = _tuned_modules(pipe, file.adapter)
    named = _named_modules(tensors)
    if named and matched < MIN_MATCHED * named:
        _forget(pipe, file.adapter)
        raise DoesNotFit(
            f"{file.spec.model} names {named} layers, of which only {matched} exist in this stage's models "
            "(a LoRA for another model?)",
            file.field,
        )
    loaded[file.adapter] = None


@contextlib.contextmanager
def _peft_quiet() -> Iterator[None]:
    """PEFT warns of what is the point here: several adapters on one model, and deleting the active one (each
    batch sets its own active set right after)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        yield


def _forget(pipe: Any, adapter: str) -> None:
    """Delete `adapter` from every component of `pipe` that holds it."""
    for name in _COMPONENTS:
        component = getattr(pipe, name, None)
        if component is None or adapter not in (getattr(component, "peft_config", None) or ()):
            continue
        with _peft_quiet():
            if name == "unet":
                component.delete_adapters([adapter])
            else:  # transformers' models: diffusers' own helper, as its pipelines' `delete_adapters` does
                from diffusers.utils.peft_utils import delete_adapter_layers

                delete_adapter_layers(component, adapter)


def _enable(pipe: Any, names: list[str], weights: list[float]) -> None:
    """Activate `names` with `weights` on every component that has them; disable adapters elsewhere (the base
    and refiner may share a text encoder, which then holds the other stage's adapters too)."""
    from diffusers.utils.peft_utils import set_adapter_layers, set_weights_and_activate_adapters

    for name in _COMPONENTS:
        component = getattr(pipe, name, None)
        present = set(getattr(component, "peft_config", None) or ())
        if component is None or not present:
            continue
        here = [(n, w) for n, w in zip(names, weights, strict=True) if n in present]
        if not here:
            set_adapter_layers(component, enabled=False)
            continue
        set_adapter_layers(component, enabled=True)
        if name == "unet":  # the UNet's own method, as a hand-run `set_adapters` calls it
            component.set_adapters([n for n, _ in here], [w for _, w in here])
        else:
            set_weights_and_activate_adapters(component, [n for n, _ in here], [w for _, w in here])


def _tuned_modules(pipe: Any, adapter: str) -> int:
    """Layers of `pipe`'s components that carry `adapter`."""
    count = 0
    for name in _COMPONENTS:
        component = getattr(pipe, name, None)
        if component is None:
            continue
        for module in component.modules():
            lora_a = getattr(module, "lora_A", None)
            if lora_a is not None and adapter in lora_a:
                count += 1
    return count


def _named_modules(tensors: dict[str, torch.Tensor]) -> int:
    """Layers a LoRA file names: one down (A) matrix per layer, in every format diffusers reads."""
    downs = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", "lora_A.default.weight")
    return sum(1 for key in tensors if key.endswith(downs))


def _untunable(unet: Any) -> str | None:
    """Why LoRAs cannot adapt this UNet as tuned, if they cannot: fused QKV projections keep no separate
    query, key and value layers for a LoRA's matrices, and FP8 layers are not the float layers it was
    trained on. Refused in so many words rather than applied to what is left."""
    if getattr(unet, FP8_MARK, False):
        return "this server runs its UNets' linear layers in FP8 (--fp8); LoRAs need it off"
    if any(getattr(m, "fused_projections", False) for m in unet.modules()):
        return "this server fuses its UNets' QKV projections (--fuse-qkv); LoRAs need --fuse-qkv off"
    return None


def _compiled(unet: Any) -> bool:
    from server.generation.compiling import UNetDispatch

    return isinstance(getattr(unet, "forward", None), UNetDispatch)
