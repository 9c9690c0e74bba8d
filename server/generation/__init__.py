"""The exact two-stage generation: the split, the samplers, the runner, previews and image encoding.

This is the room's front door: the rooms above it (`server.scheduling`, `server.api`, `server.app`) import
only the names below, never a module of this package (tests/test_layout.py holds them to it). Inside the
package, modules import each other directly. Nothing here knows of scheduling, gRPC or protobuf. A name's
module is imported when the name is first used (`server.core.front_door`): the API's use of the compile states
does not load diffusers.
"""

from typing import TYPE_CHECKING

from server.core.front_door import lazy_names

if TYPE_CHECKING:
    from server.generation.compiling import Compiler, CompileState, ShapeStatus, configure_cache
    from server.generation.encoding import Encoder, encode_image
    from server.generation.loras import LoraFile, StageLoras
    from server.generation.pipelines import PipelinePair
    from server.generation.previews import PREVIEW_MIME, encode_preview, latents_to_images
    from server.generation.results import PipelineRunner, RunResult, StageTimings
    from server.generation.runner import native_size
    from server.generation.runner import run as run_pair
    from server.generation.split import MIN_REFINER_TOTAL_STEPS, base_step_count, min_start_step, start_index
    from server.generation.stepper import Stepper, join_key
    from server.generation.steps import StepState
    from server.generation.tuning import Tuning, tune_pipeline, tuning_for

_NAMES = {
    "CompileState": "compiling:CompileState",
    "Compiler": "compiling:Compiler",
    "ShapeStatus": "compiling:ShapeStatus",
    "configure_cache": "compiling:configure_cache",
    "Encoder": "encoding:Encoder",
    "encode_image": "encoding:encode_image",
    "LoraFile": "loras:LoraFile",
    "StageLoras": "loras:StageLoras",
    "PipelinePair": "pipelines:PipelinePair",
    "PREVIEW_MIME": "previews:PREVIEW_MIME",
    "encode_preview": "previews:encode_preview",
    "latents_to_images": "previews:latents_to_images",
    "PipelineRunner": "results:PipelineRunner",
    "RunResult": "results:RunResult",
    "StageTimings": "results:StageTimings",
    "StepState": "steps:StepState",
    "Stepper": "stepper:Stepper",
    "join_key": "stepper:join_key",
    "native_size": "runner:native_size",
    "run_pair": "runner:run",
    "MIN_REFINER_TOTAL_STEPS": "split:MIN_REFINER_TOTAL_STEPS",
    "base_step_count": "split:base_step_count",
    "min_start_step": "split:min_start_step",
    "start_index": "split:start_index",
    "Tuning": "tuning:Tuning",
    "tune_pipeline": "tuning:tune_pipeline",
    "tuning_for": "tuning:tuning_for",
}
__getattr__ = lazy_names(__name__, _NAMES)
__all__ = [
    "MIN_REFINER_TOTAL_STEPS",
    "PREVIEW_MIME",
    "CompileState",
    "Compiler",
    "Encoder",
    "LoraFile",
    "PipelinePair",
    "PipelineRunner",
    "RunResult",
    "ShapeStatus",
    "StageLoras",
    "StageTimings",
    "StepState",
    "Stepper",
    "Tuning",
    "base_step_count",
    "configure_cache",
    "encode_image",
    "encode_preview",
    "join_key",
    "latents_to_images",
    "min_start_step",
    "native_size",
    "run_pair",
    "start_index",
    "tune_pipeline",
    "tuning_for",
]
