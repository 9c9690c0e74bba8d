"""Speed options applied where a pipeline is loaded onto a device, before it serves anything.

`tuning_for` turns the settings (`server.core.settings.Speed`: each option "auto", on or off) into what holds on one
device, and refuses what the device cannot do (FP8 without FP8 hardware) in one line. `tune_pipeline` then
changes the loaded modules in place, once per module (a VAE two pipelines share is tuned once):

- fused QKV projections in the UNets (diffusers' `fuse_qkv_projections`): one matrix product instead of three
  per self-attention, two per cross-attention; the same sums in another grouping, so equal up to rounding;
- FP8 (torchao, opt-in): the UNets' transformer linear layers as float8 with per-row scales;
- channels-last UNets: the convolutions' weights in the layout tensor cores read without a transpose;
- the VAE decoded in bfloat16 instead of float32. SDXL's VAE overflows in float16, which is why diffusers
  upcasts it to float32 for every decode (`force_upcast`). bfloat16 has float32's exponent range, so it cannot
  overflow where float32 does not, at float16's cost; the alternative, a VAE fine-tuned to stay in float16
  range ("fp16-fix"), is another model with other weights, not the user's. The price is bfloat16's 8-bit
  mantissa: benchmarks/gpu_sdxl.py measures the pixel difference against the float32 decode of the same latent;
- compiled UNets (`server.generation.compiling`), attached last so they trace the tuned modules.

With `compile` "off", every option left at "auto" is off too: `--compile off` is today's path exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from modelstore import Role
from server.core.settings import Speed, Toggle
from server.generation.compiling import Compiler, UNetInputs
from server.generation.loras import FP8_MARK

log = logging.getLogger(__name__)

_TUNED = "_refinery_tuned"  # set on a module once it is tuned: shared modules are tuned once
# FP8 matrix products (torch._scaled_mm) need dimensions in multiples of 16 and FP8 tensor cores.
_FP8_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class Tuning:
    """The speed options as they hold on one device."""

    compile_mode: str | None  # torch.compile's mode, None: eager
    fuse_qkv: bool = False
    channels_last: bool = False
    vae_bfloat16: bool = False
    fp8: bool = False

    @property
    def untuned(self) -> bool:
        return self == Tuning(None)

    def describe(self) -> str:
        parts = [f"compile {self.compile_mode or 'off'}"]
        parts += [name for name, on in self._flags() if on]
        return ", ".join(parts)

    def _flags(self) -> list[tuple[str, bool]]:
        return [
            ("fused QKV", self.fuse_qkv),
            ("channels-last UNets", self.channels_last),
            ("bfloat16 VAE decode", self.vae_bfloat16),
            ("FP8 UNet linears", self.fp8),
        ]


def tuning_for(speed: Speed, device: str) -> Tuning:
    """What `speed` means on `device`. Raises ValueError (one line, naming the flag) for an option the device
    cannot honour."""
    cuda = torch.device(device).type == "cuda"
    mode = speed.compile if speed.compile != "auto" else ("default" if cuda else "off")
    compiled = mode != "off"

    def on(toggle: Toggle) -> bool:
        return toggle is Toggle.ON or (toggle is Toggle.AUTO and cuda and compiled)

    if speed.vae_decode == "auto":
        vae_bfloat16 = cuda and compiled and torch.cuda.is_bf16_supported()
    else:
        vae_bfloat16 = speed.vae_decode == "bfloat16"
    if speed.fp8:
        check_fp8(device)
    return Tuning(
        compile_mode=mode if compiled else None,
        # Not on by "auto": fused projections keep no separate Q, K, V layers for a LoRA (`loras._untunable`).
        fuse_qkv=speed.fuse_qkv is Toggle.ON,
        channels_last=on(speed.channels_last),
        vae_bfloat16=vae_bfloat16,
        fp8=speed.fp8,
    )


def check_fp8(device: str) -> None:
    """Raise ValueError unless `device` can run the UNets' linear layers in FP8 and torchao is installed."""
    if torch.device(device).type != "cuda":
        raise ValueError(f"--fp8 needs a CUDA GPU with FP8 (compute capability 8.9+); {device} has none")
    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < _FP8_CAPABILITY:
        name = torch.cuda.get_device_name(torch.device(device))
        raise ValueError(
            f"--fp8: {device} ({name}, compute capability {capability[0]}.{capability[1]}) has no FP8; "
            "it needs 8.9 or newer (Ada, Hopper, Blackwell)"
        )
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise ValueError("--fp8 needs torchao: pip install 'refinery[fp8]'") from None


def tune_pipeline(pipe: Any, tuning: Tuning, *, compiler: Compiler | None, model: str, role: Role) -> None:
    """Apply `tuning` to a loaded pipeline in place; `model` and `role` name it in the compiler's status."""
    unet = pipe.unet
    if not getattr(unet, _TUNED, False):
        if tuning.fuse_qkv:
            fuse_qkv(unet)
        if tuning.fp8:
            linears_to_fp8(unet)
            setattr(unet, FP8_MARK, True)  # LoRAs refuse such a UNet (`loras._untunable`)
        if tuning.channels_last:
            unet.to(memory_format=torch.channels_last)
        if compiler is not None:
            # Inference never needs gradients, and a graph's guards check each weight's `requires_grad`:
            # loading a LoRA (PEFT freezes the weights it adapts) would otherwise void every graph for good.
            unet.requires_grad_(False)
            inputs = UNetInputs(
                tokens=int(pipe.tokenizer_2.model_max_length),
                text_dim=int(pipe.text_encoder_2.config.projection_dim),
                scale=int(pipe.vae_scale_factor),
            )
            compiler.attach(unet, model=model, role=role, inputs=inputs)
        setattr(unet, _TUNED, True)
    vae = pipe.vae
    if tuning.vae_bfloat16 and not getattr(vae, _TUNED, False):
        decode_in_bfloat16(vae)
        setattr(vae, _TUNED, True)


def fuse_qkv(unet: Any) -> None:
    """diffusers' fused projections, without the unfused layers it keeps (to unfuse later, which the service
    never does): left in place they would hold a quarter of the UNet's weights twice, beyond the budget, which
    counts the weights once."""
    unet.fuse_qkv_projections()
    for module in unet.modules():
        if getattr(module, "fused_projections", False):
            # Self-attention runs on `to_qkv` alone; cross-attention on `to_q` and `to_kv`.
            for name in ("to_k", "to_v") if module.is_cross_attention else ("to_q", "to_k", "to_v"):
                delattr(module, name)


def decode_in_bfloat16(vae: Any) -> None:
    """Keep `vae` in bfloat16. The pipelines upcast a VAE only when it is float16, and hand it latents in the
    UNet's dtype: a hook on the first layer of the decode casts them."""
    vae.to(dtype=torch.bfloat16)
    first = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else vae.decoder.conv_in

    def to_bfloat16(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0].to(torch.bfloat16), *args[1:])

    first.register_forward_pre_hook(to_bfloat16)


def linears_to_fp8(unet: Any) -> None:
    """The UNet's transformer linear layers as float8 weights and activations, scaled per row (torchao)."""
    # Imported here: torchao is an optional extra, and `tuning_for` has checked it is installed.
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    def transformer_linear(module: Any, name: str) -> bool:
        # The attention projections and feed-forwards carry nearly all of the linear work; the embeddings'
        # small layers would gain nothing and some have dimensions FP8 products cannot take.
        return (
            isinstance(module, torch.nn.Linear)
            and "transformer_blocks" in name
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
        )

    quantize_(unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=transformer_linear)
