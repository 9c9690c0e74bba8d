"""`refinery.v1.ServerService`: what the server is doing right now, for operators and dashboards."""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2

from refinery.v1 import status_pb2 as pb
from refinery.v1 import status_pb2_grpc as pb_grpc
from server.scheduler import Scheduler

STATUS_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ServerService"].full_name


class StatusService(pb_grpc.ServerServiceServicer):
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.GetStatusResponse:
        status = self._scheduler.status()
        devices = []
        for device in status.devices:
            pairs = []
            for pair in device.pairs:
                last_used = timestamp_pb2.Timestamp()
                last_used.FromNanoseconds(int(pair.last_used_wall * 1e9))
                pairs.append(
                    pb.ResidentPair(
                        model=pair.key.base,
                        refiner_model=pair.key.refiner or "",
                        bytes=pair.bytes,
                        active_jobs=pair.active,
                        pinned=pair.pinned,
                        last_used=last_used,
                    )
                )
            devices.append(
                pb.DeviceStatus(
                    name=device.name,
                    budget_bytes=device.budget_bytes,
                    resident_bytes=device.resident_bytes,
                    allocated_bytes=device.allocated_bytes,
                    pairs=pairs,
                    jobs_running=device.jobs_running,
                )
            )
        queue = pb.QueueStatus(
            depth=status.queue_depth, max_queue=status.max_queue, depth_by_priority=status.depth_by_priority
        )
        return pb.GetStatusResponse(devices=devices, queue=queue, jobs_running=status.jobs_running)
