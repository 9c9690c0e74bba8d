"""The `refinery.v1.GenerationService` servicer (grpc.aio).

Per request: validate (INVALID_ARGUMENT naming every bad field, before any work), submit to the dispatcher,
stream its events as they come, and end with OK or the status `server/status.py` gives the job's error, with
its `google.rpc` details. A client that cancels or disconnects cancels its job, which stops at the next step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc
from grpc_status import rpc_status

from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc
from server import convert
from server.dispatch import Dispatcher, Ticket
from server.settings import Settings
from server.status import rpc_error_for
from server.stream import AsyncEventStream

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name


class GenerationService(pb_grpc.GenerationServiceServicer):
    def __init__(self, dispatcher: Dispatcher, settings: Settings) -> None:
        self._dispatcher = dispatcher
        self._settings = settings

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        ticket: Ticket | None = None
        request_id = request.request_id
        try:
            job = convert.job_from_request(
                request,
                limits=self._settings.limits,
                default_model=self._settings.default_model,
                default_refiner=self._settings.default_refiner,
            )
            request_id = job.request_id
            stream = AsyncEventStream()
            remaining = context.time_remaining()
            # A deadline lets the scheduler drop the request while queued instead of running it for nobody.
            deadline = None if remaining is None else time.monotonic() + remaining
            ticket = self._dispatcher.submit(job, stream, deadline=deadline)
            async for event in stream:
                yield convert.response_for(job.request_id, event)
            return
        except Exception as exc:  # CancelledError (client gone) is a BaseException and skips this
            error = exc
        finally:
            if ticket is not None:
                # A no-op for a finished job; for a client that went away, the job stops at its next step.
                self._dispatcher.cancel(ticket)
        failure = rpc_error_for(error)  # unexpected errors: logged with traceback, client gets INTERNAL
        if ticket is None:
            # Never reached the worker, whose log line covers every job that did.
            log.info("request %s rejected: %s: %s", request_id or "-", failure.code.name, failure.message)
        await context.abort_with_status(rpc_status.to_status(failure.to_status()))
