"""The `refinery.v1.GenerationService` servicer (grpc.aio).

Per request: validate (INVALID_ARGUMENT naming every bad field, before any work), submit to the scheduler,
and stream its events as they come. The call ends with OK, or with the status `boundary.py` gives the error
the request ended with. A client that cancels or disconnects cancels its request, which stops at the next
step. The images a request reads are held in the image store until it ends; with `keep_results` each result
is stored there before it is sent, and named by its reference.

UploadImage stores one image for later requests (`uploads.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence

import grpc

from modelstore import Role
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc
from server.api import seed_inputs
from server.api.access import mark_answered
from server.api.boundary import ModelField, rpc
from server.api.convert import generate_responses
from server.api.image_fields import ImageFieldLimits
from server.api.stream import AsyncEventStream
from server.api.uploads import upload_image
from server.api.validation import job_from_request
from server.core.domain import ImageResult, Job, JobEvent
from server.core.errors import DeliveryFailed, ImageError
from server.core.logs import quoted
from server.core.settings import Settings
from server.core.tracing import TRACEPARENT, TRACESTATE, Tracer
from server.images import ImageStore
from server.scheduling import Engine, Ticket, Trace, start_trace

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"]
SERVICE_NAME = SERVICE.full_name


class GenerationService(pb_grpc.GenerationServiceServicer):
    def __init__(
        self, scheduler: Engine, settings: Settings, images: ImageStore, *, tracer: Tracer | None = None
    ) -> None:
        self._scheduler = scheduler
        self._settings = settings
        self._images = images
        self._tracer = tracer  # None: tracing off

    def _models(self, request: pb.GenerateRequest) -> Sequence[ModelField]:
        base = ModelField("model", request.model, Role.BASE, self._settings.default_model)
        refiner = ModelField("refiner.model", request.refiner.model, Role.REFINER, self._settings.default_refiner)
        models = [base, refiner] if request.HasField("refiner") else [base]
        for prefix, loras in (("", request.loras), ("refiner.", request.refiner.loras)):
            models += [ModelField(f"{prefix}loras[{i}].model", lora.model, Role.LORA) for i, lora in enumerate(loras)]
        return models

    @rpc(
        "Generate",
        describe=lambda request: quoted(request.request_id or "-"),
        models=_models,
        request_id=lambda request: str(request.request_id),
    )
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        settings = self._settings
        trace = start_trace(self._tracer, _trace_context(context))
        held = contextlib.ExitStack()  # the images the request reads: kept on disk past their expiry until it ends
        try:
            job, stream, ticket = await self._submit(request, context, trace, held)
        except BaseException as exc:
            held.close()
            if trace is not None:
                trace.abandon(exc, request.request_id)
            raise
        try:
            with held:
                async for event in stream:
                    event = await self._kept(event, job)
                    for response in generate_responses(job.request_id, event, settings.image_chunk_bytes):
                        yield response  # a client that cannot take a message ends the generator here
                    if stream.sent(event, job):
                        mark_answered(context)  # its last image is out: OK, however the client closes the call now
            stream.settle(None)
        finally:
            stream.settle(DeliveryFailed("the client did not receive the whole stream"))  # unless settled
            # A no-op for a finished request; for a client that went away, it stops at its next step.
            self._scheduler.cancel(ticket)

    async def _kept(self, event: JobEvent, job: Job) -> JobEvent:
        """A result of a request with `keep_results`, stored (off the event loop) and named by its reference;
        any other event as it is. A result the store cannot keep (its quota full) is still sent, without a
        reference, and the log says why: the client has its image, which it may upload itself."""
        if not isinstance(event, ImageResult) or job.keep_results_s <= 0:
            return event
        try:
            stored = await asyncio.to_thread(self._images.put_bytes, event.data, job.keep_results_s)
        except ImageError as exc:
            log.warning("request %s: result %d not kept: %s", quoted(job.request_id), event.index, exc)
            return event
        return dataclasses.replace(event, reference=stored.reference, reference_expires=stored.expires_at)

    @rpc("UploadImage")
    async def UploadImage(
        self, requests: AsyncIterator[pb.UploadImageRequest], context: grpc.aio.ServicerContext
    ) -> pb.UploadImageResponse:
        return await upload_image(self._images, requests)

    async def _submit(
        self,
        request: pb.GenerateRequest,
        context: grpc.aio.ServicerContext,
        trace: Trace | None,
        held: contextlib.ExitStack,
    ) -> tuple[Job, AsyncEventStream, Ticket]:
        """Validate and admit the request (raises what refuses it); the images it reads are held in `held`."""
        settings = self._settings

        def validate() -> Job:
            job = job_from_request(
                request,
                limits=settings.limits,
                default_model=settings.default_model,
                default_refiner=settings.default_refiner,
                work_limit=self._scheduler.work_limit,
                local_roots=settings.security.local_model_roots,
                image_limits=ImageFieldLimits.of(settings.images),
            )
            job = seed_inputs.resolve(
                request, job, self._images, settings.limits, work_limit=self._scheduler.work_limit
            )
            # Held from the moment they are found, before the request is admitted: a sweep cannot take them while
            # it waits in the queue.
            held.enter_context(self._images.hold(seed_inputs.images_of(job)))
            return job

        # Reading weighting syntax takes compel's parser up to a second or two for a 4000-character prompt, and an
        # inline image is written to disk: never on the event loop, which serves every other call. Plain prompts
        # take milliseconds.
        slow = request.prompt_weighting or request.HasField("image")
        job = await asyncio.to_thread(validate) if slow else validate()
        stream = AsyncEventStream()
        remaining = context.time_remaining()
        # A deadline lets the scheduler drop the request while queued instead of running it for nobody.
        deadline = None if remaining is None else time.monotonic() + remaining
        return job, stream, self._scheduler.submit(job, stream, deadline=deadline, trace=trace)


def _trace_context(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The caller's W3C trace context from the call's metadata (nothing else of it: never its token)."""
    wanted = (TRACEPARENT, TRACESTATE)
    return {
        key: value for key, value in context.invocation_metadata() or () if key in wanted and isinstance(value, str)
    }
