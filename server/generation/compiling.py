"""Compiled UNets that never stall a request or readiness.

A UNet's `forward` is replaced by a `UNetDispatch` when it is loaded. A call of a shape whose graph is ready
goes through `torch._dynamo.run`, Dynamo's run-only mode, which runs the cached graph and never compiles (a
guard that fails costs an eager step, not a compile of a minute on the worker's thread); every other call runs
the UNet eagerly, and an unseen size is queued. The graphs are compiled by the device's `Compiler` on a thread
of its own:

- what it compiles: the native size of every pinned pair as soon as the pair is resident, then any other shape a
  UNet is called with (up to `max_sizes` per UNet; others stay eager), each for every batch of up to
  `max_images` images: the batch dimension is dynamic (2..2 x max_images with classifier-free guidance), so one
  graph serves them all and a pair costs two compiles, not two per batch size. A shape is an image size and a
  text length: a prompt of k 75-token windows is a sequence of 77 x k, a shape of its own (one graph per window
  count, compiled on demand like a size and counted against the same bound), so a long prompt runs eagerly
  until its graph is ready and never waits for it, nor makes anyone else wait;
- how it shares the device: tracing and code generation (seconds to minutes of CPU) run beside the worker, but
  every run of a compiled graph, the first one included (which is where Triton tunes its kernels), holds
  `device_lock`, which the worker holds while it runs a batch. So the compiler's one device pass per shape
  happens between two batches: no real work shares the device with it or waits more than one such pass;
- the switch: when a shape's first run returns, its graph is in Dynamo's cache and the next call of that shape
  (the next denoising step, even within a running request) takes it;
- its caches (Inductor's FX graph cache, AOTAutograd's, Triton's kernels) live under `cache_dir`, on the model
  cache's volume by default: a restarted server finds them there and compiles nothing again; only Dynamo's
  tracing (seconds) is repeated.

Modes with CUDA graphs ("reduce-overhead", "max-autotune") record one graph per batch size on the thread that
replays it (CUDA graph trees are per thread), so the worker records them on its first call of each size; their
outputs live in memory the next replay overwrites, so the dispatch copies the one output out.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from modelstore import Role
from server.core.domain import WINDOW_TOKENS

log = logging.getLogger(__name__)

_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# The keyword arguments SDXL pipelines pass besides the conditioning; anything else runs eagerly.
_NEUTRAL = (
    "timestep_cond",
    "cross_attention_kwargs",
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
    "encoder_attention_mask",
    "attention_mask",
    "class_labels",
)


# What a graph is traced for: latent (height, width) and the text sequence length (77 per prompt window).
ShapeKey = tuple[int, int, int]


class CompileState(Enum):
    QUEUED = "queued"
    COMPILING = "compiling"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class ShapeStatus:
    """One compiled (or compiling) shape of one UNet, for GetStatus and the metrics."""

    model: str  # the UNet's model, by its canonical AIR: a name for the status and the metrics
    role: Role
    width: int  # image pixels
    height: int
    max_images: int
    state: CompileState
    pinned: bool = False  # asked for by a pinned pair (not counted against `max_sizes`)
    seconds: float = 0.0  # time to compile and run it once, once ready or failed
    error: str = ""
    tokens: int = WINDOW_TOKENS  # the text sequence: 77 per prompt window


@dataclass(frozen=True)
class UNetInputs:
    """What a UNet is called with besides the latent, to build example inputs before any request comes."""

    tokens: int  # the text encoders' sequence length of one prompt window (77); pinned shapes are compiled at it
    text_dim: int  # the pooled text embedding's width (OpenCLIP bigG's projection, 1280 in SDXL)
    scale: int  # image pixels per latent pixel (8)


def configure_cache(cache_dir: Path) -> None:
    """Keep torch.compile's caches under `cache_dir` (Inductor reads the variable when it compiles, and Triton's
    kernel cache defaults to a folder inside it); turn on the caches that make a restart cheap."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    # Dynamo keeps at most this many graphs per function; every UNet's graphs hang off one function.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


# How a traced graph becomes code: Inductor (`inductor`), or a test's stand-in. (graph, example inputs, mode).
GraphCompiler = Callable[[Any, list[Any], str], Callable[..., Any]]


def inductor(graph: Any, example_inputs: list[Any], mode: str) -> Callable[..., Any]:
    """What torch.compile(mode=mode) does with a graph Dynamo traced, through the same entry point."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(graph, example_inputs, config_patches=list_mode_options(mode, dynamic=False))  # type: ignore[no-any-return]


class _Tls(threading.local):
    compiled_ran = False


class UNetDispatch:
    """A UNet's `forward`: its compiled graph for shapes that have one, eager otherwise."""

    def __init__(self, unet: Any, *, model: str, role: Role, inputs: UNetInputs, compiler: Compiler) -> None:
        self.unet = unet
        self.model = model
        self.role = role
        self.label = f"{model} ({role})"
        self.inputs = inputs
        self.shapes: dict[ShapeKey, ShapeStatus] = {}  # latent (height, width), text tokens -> status
        self.calls = {"compiled": 0, "eager": 0}
        self._forward = type(unet).forward
        self._compiler = weakref.ref(compiler)
        self._run_only = torch._dynamo.run(self._core)
        self.compiled = torch.compile(self._core, backend=compiler.backend, fullgraph=True, dynamic=False)

    def _core(self, sample: Any, timestep: Any, encoder_hidden_states: Any, text_embeds: Any, time_ids: Any) -> Any:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self._forward(
            self.unet,
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]

    def __call__(self, sample: Any, timestep: Any, encoder_hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        added = kwargs.get("added_cond_kwargs") or {}
        plain = not args and set(added) == {"text_embeds", "time_ids"}
        if plain and all(not kwargs.get(name) for name in _NEUTRAL):
            out = self._compiled_call(sample, timestep, encoder_hidden_states, added)
            if out is not None:
                if kwargs.get("return_dict", True):
                    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

                    return UNet2DConditionOutput(sample=out)
                return (out,)
        self.calls["eager"] += 1
        return self._forward(self.unet, sample, timestep, encoder_hidden_states, *args, **kwargs)

    def _compiled_call(self, sample: Any, timestep: Any, encoder_hidden_states: Any, added: dict[str, Any]) -> Any:
        # A longer prompt is a longer text sequence: a shape of its own, compiled on demand like a size.
        key = (int(sample.shape[-2]), int(sample.shape[-1]), int(encoder_hidden_states.shape[1]))
        status = self.shapes.get(key)
        if status is None:
            compiler = self._compiler()
            if compiler is not None:
                compiler.request(self, key, pinned=False)
            return None
        if status.state is not CompileState.READY or not 2 <= sample.shape[0] <= 2 * status.max_images:
            return None
        if torch.is_tensor(timestep) and timestep.numel() != 1:  # one timestep per sample: not how it was traced
            return None
        # Inputs exactly as the graph was traced with (contiguous; the timestep a float32 scalar on the device:
        # an int64 timestep gives the same embedding, which casts it to float first), so its guards hold.
        t = torch.as_tensor(timestep, device=sample.device).to(torch.float32).reshape(())
        args = [x.contiguous() for x in (sample, encoder_hidden_states, added["text_embeds"], added["time_ids"])]
        cuda_graphs = self._compiler_mode() in _CUDA_GRAPH_MODES
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        _TLS.compiled_ran = False
        out = self._run_only(args[0], t, args[1], args[2], args[3])
        self.calls["compiled" if _TLS.compiled_ran else "eager"] += 1
        return out.clone() if cuda_graphs else out

    def _compiler_mode(self) -> str:
        compiler = self._compiler()
        return compiler.mode if compiler is not None else ""

    def example_inputs(self, key: ShapeKey, batch: int) -> list[Any]:
        unet, dtype, device = self.unet, self.unet.dtype, self.unet.device
        config = unet.config
        time_ids = (config.projection_class_embeddings_input_dim - self.inputs.text_dim) // (
            config.addition_time_embed_dim
        )
        sample = torch.randn(batch, config.in_channels, *key[:2], dtype=dtype, device=device)
        hidden = torch.randn(batch, key[2], config.cross_attention_dim, dtype=dtype, device=device)
        text = torch.randn(batch, self.inputs.text_dim, dtype=dtype, device=device)
        ids = torch.full((batch, time_ids), 1024.0, dtype=dtype, device=device)
        return [sample, torch.tensor(999.0, device=device), hidden, text, ids]


_TLS = _Tls()


class Compiler:
    """One device's compiler thread. `attach` a UNet when it loads; `request` its pinned shapes; `close` at the
    end. Thread contract: `device_lock` is held by whoever uses the device (the worker around each batch, this
    thread around each run of a compiled graph)."""

    def __init__(
        self, device: str, mode: str, *, max_images: int, max_sizes: int, compile_graph: GraphCompiler = inductor
    ) -> None:
        self.device = device
        self.mode = mode
        self._compile_graph = compile_graph
        self.max_images = max_images
        self.max_sizes = max_sizes
        self.device_lock = threading.RLock()
        self._lock = threading.Lock()
        self._dispatches: weakref.WeakSet[UNetDispatch] = weakref.WeakSet()
        self._jobs: queue.Queue[tuple[weakref.ref[UNetDispatch], ShapeKey] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._refused: set[tuple[str, ShapeKey]] = set()

    # ---- the worker's side --------------------------------------------------------------------------------

    def attach(self, unet: Any, *, model: str, role: Role, inputs: UNetInputs) -> UNetDispatch:
        dispatch = UNetDispatch(unet, model=model, role=role, inputs=inputs, compiler=self)
        unet.forward = dispatch  # nn.Module.__call__ calls the instance's `forward`
        with self._lock:
            self._dispatches.add(dispatch)
        return dispatch

    def request(self, dispatch: UNetDispatch, key: ShapeKey, *, pinned: bool) -> None:
        """Queue `key` (latent height, width) of `dispatch` unless known; an unpinned size only while the UNet
        has fewer than `max_sizes` unpinned ones."""
        with self._lock:
            known = dispatch.shapes.get(key)
            if known is not None:
                if pinned and not known.pinned:  # first seen in a request, now asked for by a pin
                    dispatch.shapes[key] = dataclasses.replace(known, pinned=True)
                return
            unpinned = sum(1 for s in dispatch.shapes.values() if not s.pinned)
            if not pinned and unpinned >= self.max_sizes:
                if (dispatch.label, key) not in self._refused:
                    self._refused.add((dispatch.label, key))
                    log.info(
                        "%s: %dx%d stays eager (%d sizes compiled already)",
                        dispatch.label,
                        *_pixels(dispatch, key),
                        unpinned,
                    )
                return
            dispatch.shapes[key] = self._status(dispatch, key, CompileState.QUEUED, pinned=pinned)
            self._jobs.put((weakref.ref(dispatch), key))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"refinery-compile-{self.device}", daemon=True)
                self._thread.start()

    def request_size(self, unet: Any, width: int, height: int) -> None:
        """Compile `unet` (attached) at `width` x `height` pixels, as for a pinned pair."""
        dispatch = unet.forward
        if isinstance(dispatch, UNetDispatch):
            scale = dispatch.inputs.scale
            self.request(dispatch, (height // scale, width // scale, dispatch.inputs.tokens), pinned=True)

    def snapshot(self) -> tuple[tuple[ShapeStatus, ...], dict[str, int]]:
        """Every shape of every live UNet, and how many UNet calls ran compiled and eager."""
        with self._lock:
            dispatches = list(self._dispatches)
            shapes = tuple(s for d in dispatches for s in d.shapes.values())
        calls = {
            "compiled": sum(d.calls["compiled"] for d in dispatches),
            "eager": sum(d.calls["eager"] for d in dispatches),
        }
        return shapes, calls

    def wait_idle(self, timeout_s: float) -> bool:
        """Whether every queued shape is compiled (or failed) within `timeout_s`; for tests and benchmarks."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            shapes, _ = self.snapshot()
            if all(s.state in (CompileState.READY, CompileState.FAILED) for s in shapes):
                return True
            time.sleep(0.05)
        return False

    def close(self, timeout_s: float | None = None) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout_s)

    # ---- Dynamo's side --------------------------------------------------------------------------------------

    def backend(self, graph: Any, example_inputs: list[Any]) -> Callable[..., Any]:
        """The graph compiled (Inductor), every run of it holding the device lock and telling the dispatch it ran."""
        compiled = self._compile_graph(graph, example_inputs, self.mode)
        lock = self.device_lock

        @functools.wraps(compiled)
        def run(*args: Any) -> Any:
            with lock:
                _TLS.compiled_ran = True
                return compiled(*args)

        return run

    # ---- the compiler's thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._take(*job)
            del job  # nothing of an evicted UNet may stay alive here while the thread waits for the next job

    def _take(self, ref: weakref.ref[UNetDispatch], key: ShapeKey) -> None:
        dispatch = ref()
        if dispatch is not None:  # an evicted UNet's shapes are dropped
            self._compile(dispatch, key)

    def _compile(self, dispatch: UNetDispatch, key: ShapeKey) -> None:
        self._set(dispatch, key, CompileState.COMPILING)
        inputs = dispatch.example_inputs(key, batch=2)
        if self.max_images > 1:  # one graph for every batch size: 2 latents per image with guidance
            for index in (0, 2, 3, 4):
                torch._dynamo.mark_dynamic(inputs[index], 0, min=2, max=2 * self.max_images)
        started = time.perf_counter()
        try:
            with torch.no_grad():  # as the pipelines call the UNet: grad mode is one of the graph's guards
                dispatch.compiled(*inputs)
        except Exception as exc:  # a graph break, an unsupported op: this shape stays eager
            log.warning(
                "compiling %s at %dx%d failed; it stays eager", dispatch.label, *_pixels(dispatch, key), exc_info=exc
            )
            self._set(dispatch, key, CompileState.FAILED, time.perf_counter() - started, f"{type(exc).__name__}: {exc}")
            return
        seconds = time.perf_counter() - started
        self._set(dispatch, key, CompileState.READY, seconds)
        log.info(
            "compiled %s at %dx%d (up to %d images) in %.1fs",
            dispatch.label,
            *_pixels(dispatch, key),
            self.max_images,
            seconds,
        )

    def _status(self, dispatch: UNetDispatch, key: ShapeKey, state: CompileState, *, pinned: bool) -> ShapeStatus:
        width, height = _pixels(dispatch, key)
        return ShapeStatus(dispatch.model, dispatch.role, width, height, self.max_images, state, pinned, tokens=key[2])

    def _set(
        self, dispatch: UNetDispatch, key: ShapeKey, state: CompileState, seconds: float = 0.0, error: str = ""
    ) -> None:
        with self._lock:
            old = dispatch.shapes[key]
            dispatch.shapes[key] = dataclasses.replace(old, state=state, seconds=seconds, error=error[:500])


def _pixels(dispatch: UNetDispatch, key: ShapeKey) -> tuple[int, int]:
    """(width, height) in image pixels of a latent (height, width) key."""
    return key[1] * dispatch.inputs.scale, key[0] * dispatch.inputs.scale
