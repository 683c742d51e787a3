"""Orchestrator gRPC servicer: the public API. Validates, plans, runs the stages."""
from __future__ import annotations

import logging
import uuid
from typing import AsyncIterator

import grpc

from diffmesh.proto.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from diffmesh.errors import MeshError
from diffmesh.runtime.logs import log_event, prompt_hash
from diffmesh.runtime.telemetry import annotate
from services.orchestrator.pipeline import Deadline, Generation
from services.orchestrator.plan import Limits, ModelCatalog, plan_request
from services.orchestrator.routing import StageRouter
from services.orchestrator.shadow import ShadowDiffer

log = logging.getLogger("diffmesh.orchestrator")


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(self, router: StageRouter, default_timeout_s: float, shadow: ShadowDiffer | None = None) -> None:
        self._router = router
        self._default_timeout_s = default_timeout_s
        self._shadow = shadow
        self._limits: Limits | None = None
        self._catalog: ModelCatalog | None = None

    def configure(self, limits: Limits, catalog: ModelCatalog) -> None:
        """Called once the registry is read (the runtime answers UNAVAILABLE until then)."""
        self._limits = limits
        self._catalog = catalog

    def _generation(self, request: orchestrator_pb2.GenerateRequest, context: grpc.aio.ServicerContext,
                    progress: bool) -> Generation:
        request_id = uuid.uuid4().hex
        plan = plan_request(request, self._limits, self._catalog, request_id)
        remaining = context.time_remaining()
        deadline = Deadline(self._default_timeout_s if remaining is None else remaining)
        attributes = {"diffmesh.request_id": request_id, "diffmesh.model": plan.model.entry.id,
                      "diffmesh.prompt_hash": prompt_hash(plan.prompt), "diffmesh.steps": plan.steps,
                      "diffmesh.scheduler": plan.scheduler, "diffmesh.size": f"{plan.width}x{plan.height}",
                      "diffmesh.batch_size": len(plan.seeds), "diffmesh.img2img": plan.is_img2img}
        annotate(**attributes)
        log_event(log, "generate", **{key.split(".", 1)[1]: value for key, value in attributes.items()})
        return Generation(plan, self._router, deadline, request.request_key or request_id, self._shadow,
                          self._default_timeout_s, progress)

    async def Generate(self, request: orchestrator_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> orchestrator_pb2.GenerateResponse:
        generation = self._generation(request, context, progress=False)
        async for event in generation.run():
            if event.HasField("result"):
                return event.result
        raise MeshError("generation ended without a result")

    async def GenerateStream(self, request: orchestrator_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[orchestrator_pb2.GenerateEvent]:
        generation = self._generation(request, context, progress=True)
        async for event in generation.run():
            yield event
