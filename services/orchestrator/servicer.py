"""Orchestrator gRPC servicer: the public API. Admits, validates, plans, runs the request's flow.

Every request takes an admission slot first (max_concurrency computing, max_queue waiting,
RESOURCE_EXHAUSTED beyond), for its whole life: planning decodes the init image and masks, so
the bound covers that memory too. Generate then checks that its reply can fit the unary limit
before any stage works; GenerateStream sends images in chunks and has no such limit.
"""
from __future__ import annotations

import logging
import uuid
from contextlib import aclosing
from typing import AsyncIterator

import grpc

from diffmesh.errors import InvalidArgument
from diffmesh.proto.v1 import orchestrator_pb2, orchestrator_pb2_grpc, safety_pb2
from diffmesh.runtime.logs import log_event, prompt_hash
from diffmesh.runtime.server import Admission
from diffmesh.runtime.telemetry import annotate
from services.orchestrator.clients import CallContext, Deadline, StageClients
from services.orchestrator.plan import Limits, ModelCatalog, plan_request
from services.orchestrator.replies import MIB, STOCK_CLIENT_LIMIT, check_predicted, check_reply
from services.orchestrator.flows import choose_flow
from services.orchestrator.steps import Flow, FlowRun, RequestState, complete, run_flow

log = logging.getLogger("diffmesh.orchestrator")


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(self, clients: StageClients, catalog: ModelCatalog, limits: Limits, default_timeout_s: float,
                 *, admission: Admission | None = None,
                 max_unary_reply_bytes: int = STOCK_CLIENT_LIMIT, stream_chunk_bytes: int = 3 * MIB,
                 readiness_wait_s: float = 1.0) -> None:
        self._clients = clients
        self._catalog = catalog
        self._limits = limits
        self._default_timeout_s = default_timeout_s
        self._admission = admission or Admission("orchestrator", 64, 64)
        self._max_unary_reply_bytes = max_unary_reply_bytes
        self._stream_chunk_bytes = stream_chunk_bytes
        self._readiness_wait_s = readiness_wait_s

    def _start(self, request: orchestrator_pb2.GenerateRequest, context: grpc.aio.ServicerContext,
               progress: bool) -> tuple[Flow, RequestState, FlowRun]:
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
        run = FlowRun(self._clients, call, progress, stream_chunk_bytes=self._stream_chunk_bytes, readiness_wait_s=self._readiness_wait_s)
        return flow, RequestState(plan), run

    async def Generate(self, request: orchestrator_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> orchestrator_pb2.GenerateResponse:
        async with self._admission.slot():
            flow, state, run = self._start(request, context, progress=False)
            plan = state.plan
            # FAILED_PRECONDITION before any stage works when the reply could not be delivered.
            check_predicted(len(plan.seeds), plan.width, plan.height, plan.output_format, self._max_unary_reply_bytes)
            reply = await complete(flow, state, run)
            check_reply(reply, self._max_unary_reply_bytes)
            _safety_trailer(context, state)
            return reply

    async def GenerateStream(self, request: orchestrator_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[orchestrator_pb2.GenerateEvent]:
        async with self._admission.slot():
            flow, state, run = self._start(request, context, progress=True)
            # aclosing: when this stream ends early, the flow's generator is closed here, in this
            # call's task, not later by the garbage collector in whatever context runs then.
            async with aclosing(run_flow(flow, state, run)) as events:
                async for event in events:
                    yield event
            _safety_trailer(context, state)

    async def FetchReviewed(self, request: orchestrator_pb2.FetchReviewedRequest,
                            context: grpc.aio.ServicerContext) -> orchestrator_pb2.GenerateResponse:
        """An approved review case's image, marked and signed by the safety stage."""
        async with self._admission.slot():
            if not request.case_id:
                raise InvalidArgument("case_id", "", "required (ImageSafety.case_id of a reply)")
            remaining = context.time_remaining()
            call = CallContext(uuid.uuid4().hex, request.case_id,
                               Deadline(self._default_timeout_s if remaining is None else remaining))
            self._clients.require("safety")
            released = await self._clients.safety.release_case(call, safety_pb2.ReleaseCaseRequest(
                case_id=request.case_id, format=request.output_format, quality=request.quality))
            case = released.case
            info = orchestrator_pb2.GenerationInfo(request_id=case.request_id, model=case.model_id,
                                                   width=case.width, height=case.height, timings=call.timings,
                                                   cost=call.cost())
            info.safety.policy_version = released.image.marking.policy_version
            info.safety.images.add(index=0, returned=True, case_id=case.case_id, decisions=case.decisions)
            image = orchestrator_pb2.GeneratedImage(image=released.image.image, marking=released.image.marking)
            return orchestrator_pb2.GenerateResponse(images=[image], info=info)


def _safety_trailer(context: grpc.aio.ServicerContext, state: RequestState) -> None:
    """The most severe safety decision as trailing metadata (for proxies and logs that do not
    parse the reply): "<OUTCOME> <category> <policy version>"."""
    if state.safety is not None:
        context.set_trailing_metadata((("diffmesh-safety", state.safety.trailer()),))
