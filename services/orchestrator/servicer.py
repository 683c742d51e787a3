"""Orchestrator gRPC servicer: the public API. Admits, validates, plans, runs the request's flow.

Every request passes caller admission first (services.orchestrator.callers: identify, model
allowed, rate limit, caller quota), then takes a slot of the priority gate (max_concurrency
running, max_queue waiting, interactive before batch; RESOURCE_EXHAUSTED beyond), for its whole
life: planning decodes the init image and masks, so the bound covers that memory too. A
GenerateStream that has to wait is told its queue position, as events, before any progress.
Generate then checks that its reply can fit the unary limit before any stage works;
GenerateStream sends images in chunks and has no such limit.
"""
from __future__ import annotations

import logging
import uuid
from contextlib import aclosing
from typing import AsyncIterator

import grpc

from diffmesh.errors import InvalidArgument
from diffmesh.proto.v1 import orchestrator_pb2, orchestrator_pb2_grpc, safety_pb2
from diffmesh.runtime import telemetry
from diffmesh.runtime.admission import Ticket
from diffmesh.runtime.logs import log_event, prompt_hash
from diffmesh.runtime.telemetry import annotate
from services.orchestrator.callers import Admitted, CallerAdmission, caller_admission, credentials_from_context
from services.orchestrator.clients import CallContext, Deadline, StageClients
from services.orchestrator.plan import Limits, ModelCatalog, plan_request, requested_model
from services.orchestrator.replies import MIB, STOCK_CLIENT_LIMIT, check_predicted, check_reply
from services.orchestrator.flows import choose_flow
from services.orchestrator.steps import Flow, FlowRun, RequestState, complete, run_flow

log = logging.getLogger("diffmesh.orchestrator")


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(self, clients: StageClients, catalog: ModelCatalog, limits: Limits, default_timeout_s: float,
                 *, admission: CallerAdmission | None = None,
                 max_unary_reply_bytes: int = STOCK_CLIENT_LIMIT, stream_chunk_bytes: int = 3 * MIB,
                 readiness_wait_s: float = 1.0) -> None:
        self._clients = clients
        self._catalog = catalog
        self._limits = limits
        self._default_timeout_s = default_timeout_s
        self._admission = admission or caller_admission("orchestrator", 64, 64)  # open: no callers file
        self._max_unary_reply_bytes = max_unary_reply_bytes
        self._stream_chunk_bytes = stream_chunk_bytes
        self._readiness_wait_s = readiness_wait_s

    def _model_id(self, request: orchestrator_pb2.GenerateRequest) -> str:
        """The model the request will use, as plan_request resolves it."""
        return requested_model(request, self._limits, self._catalog)

    def _admit(self, context: grpc.aio.ServicerContext, model_id: str | None) -> Admitted:
        """Identify, model, rate (the checks before the caller's quota and the queue)."""
        admitted = self._admission.check(credentials_from_context(context), model_id)
        annotate(**{"diffmesh.caller": admitted.name, "diffmesh.priority": admitted.priority})
        return admitted

    @staticmethod
    async def _wait(ticket: Ticket) -> None:
        if not ticket.granted:
            with telemetry.tracer().start_as_current_span("queue_wait", attributes={
                    "diffmesh.priority": ticket.priority}):
                await ticket.wait()

    def _start(self, request: orchestrator_pb2.GenerateRequest, context: grpc.aio.ServicerContext,
               progress: bool, admitted: Admitted) -> tuple[Flow, RequestState, FlowRun]:
        request_id = uuid.uuid4().hex
        plan = plan_request(request, self._limits, self._catalog, request_id)
        flow = choose_flow(plan)
        remaining = context.time_remaining()
        deadline = Deadline(self._default_timeout_s if remaining is None else remaining)
        attributes = {"diffmesh.request_id": request_id, "diffmesh.model": plan.model.entry.id,
                      "diffmesh.prompt_hash": prompt_hash(plan.prompt), "diffmesh.steps": plan.steps,
                      "diffmesh.scheduler": plan.scheduler, "diffmesh.size": f"{plan.width}x{plan.height}",
                      "diffmesh.batch_size": len(plan.seeds), "diffmesh.img2img": plan.is_img2img,
                      "diffmesh.flow": flow.name, "diffmesh.caller": admitted.name,
                      "diffmesh.priority": admitted.priority}
        annotate(**attributes)
        log_event(log, "generate", **{key.split(".", 1)[1]: value for key, value in attributes.items()})
        call = CallContext(request_id, request.request_key or request_id, deadline, priority=admitted.priority)
        run = FlowRun(self._clients, call, progress, stream_chunk_bytes=self._stream_chunk_bytes, readiness_wait_s=self._readiness_wait_s)
        return flow, RequestState(plan), run

    async def Generate(self, request: orchestrator_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> orchestrator_pb2.GenerateResponse:
        admitted = self._admit(context, self._model_id(request))
        async with self._admission.enter(admitted) as ticket:
            await self._wait(ticket)
            flow, state, run = self._start(request, context, progress=False, admitted=admitted)
            plan = state.plan
            # FAILED_PRECONDITION before any stage works when the reply could not be delivered.
            check_predicted(len(plan.seeds), plan.width, plan.height, plan.output_format, self._max_unary_reply_bytes)
            reply = await complete(flow, state, run)
            check_reply(reply, self._max_unary_reply_bytes)
            _safety_trailer(context, state)
            return reply

    async def GenerateStream(self, request: orchestrator_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[orchestrator_pb2.GenerateEvent]:
        admitted = self._admit(context, self._model_id(request))
        async with self._admission.enter(admitted) as ticket:
            if not ticket.granted:
                # Before any progress: where the request stands, again each time it moves. (A span
                # that is not made current: the context must not be switched across yields.)
                span = telemetry.tracer().start_span("queue_wait", attributes={"diffmesh.priority": ticket.priority})
                try:
                    async with aclosing(ticket.positions()) as places:
                        async for place in places:
                            yield orchestrator_pb2.GenerateEvent(queue_position=orchestrator_pb2.QueuePosition(
                                position=place.position, waiting=place.waiting, priority=place.priority))
                finally:
                    span.end()
            flow, state, run = self._start(request, context, progress=True, admitted=admitted)
            # aclosing: when this stream ends early, the flow's generator is closed here, in this
            # call's task, not later by the garbage collector in whatever context runs then.
            async with aclosing(run_flow(flow, state, run)) as events:
                async for event in events:
                    yield event
            _safety_trailer(context, state)

    async def FetchReviewed(self, request: orchestrator_pb2.FetchReviewedRequest,
                            context: grpc.aio.ServicerContext) -> orchestrator_pb2.GenerateResponse:
        """An approved review case's image, marked and signed by the safety stage."""
        admitted = self._admit(context, None)  # no model to check: the case's was checked when generated
        async with self._admission.enter(admitted) as ticket:
            await self._wait(ticket)
            if not request.case_id:
                raise InvalidArgument("case_id", "", "required (ImageSafety.case_id of a reply)")
            remaining = context.time_remaining()
            call = CallContext(uuid.uuid4().hex, request.case_id,
                               Deadline(self._default_timeout_s if remaining is None else remaining),
                               priority=admitted.priority)
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
