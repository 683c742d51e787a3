"""Orchestrator gRPC servicer: the public API. Validates, plans, runs the request's flow."""
from __future__ import annotations

import logging
import uuid
from typing import AsyncIterator

import grpc

from diffmesh.errors import MeshError
from diffmesh.proto.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from diffmesh.runtime.logs import log_event, prompt_hash
from diffmesh.runtime.telemetry import annotate
from services.orchestrator.clients import CallContext, Deadline, StageClients
from services.orchestrator.plan import Limits, ModelCatalog, plan_request
from services.orchestrator.steps import FlowRun, RequestState, choose_flow, run_flow

log = logging.getLogger("diffmesh.orchestrator")


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(self, clients: StageClients, catalog: ModelCatalog, limits: Limits, default_timeout_s: float,
                 png_compress_level: int = 4) -> None:
        self._clients = clients
        self._catalog = catalog
        self._limits = limits
        self._default_timeout_s = default_timeout_s
        self._png_compress_level = png_compress_level

    def _events(self, request: orchestrator_pb2.GenerateRequest, context: grpc.aio.ServicerContext,
                progress: bool) -> AsyncIterator[orchestrator_pb2.GenerateEvent]:
        request_id = uuid.uuid4().hex
        plan = plan_request(request, self._limits, self._catalog, request_id)
        flow = choose_flow(plan)
        remaining = context.time_remaining()
        deadline = Deadline(self._default_timeout_s if remaining is None else remaining)
        attributes = {"diffmesh.request_id": request_id, "diffmesh.model": plan.model.entry.id,
                      "diffmesh.prompt_hash": prompt_hash(plan.prompt), "diffmesh.steps": plan.steps,
                      "diffmesh.scheduler": plan.scheduler, "diffmesh.size": f"{plan.width}x{plan.height}",
                      "diffmesh.batch_size": len(plan.seeds), "diffmesh.img2img": plan.is_img2img,
                      "diffmesh.flow": flow.name}
        annotate(**attributes)
        log_event(log, "generate", **{key.split(".", 1)[1]: value for key, value in attributes.items()})
        call = CallContext(request_id, request.request_key or request_id, deadline)
        run = FlowRun(self._clients, call, progress, png_compress_level=self._png_compress_level)
        return run_flow(flow, RequestState(plan), run)

    async def Generate(self, request: orchestrator_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> orchestrator_pb2.GenerateResponse:
        async for event in self._events(request, context, progress=False):
            if event.HasField("result"):
                return event.result
        raise MeshError("generation ended without a result")

    async def GenerateStream(self, request: orchestrator_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[orchestrator_pb2.GenerateEvent]:
        async for event in self._events(request, context, progress=True):
            yield event
