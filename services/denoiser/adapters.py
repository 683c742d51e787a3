"""LoRA adapters on a served UNet: attaching them (switchable, never fused) and switching between
adapter sets safely while several compute threads share the UNet.

The adapters are PEFT LoRA layers injected by diffusers' LoRA loading (through
diffmesh.models.photomaker.load_photomaker_lora, the project's one LoRA loader). Which ones a
forward pass applies is module state of the UNet (every LoRA layer's active adapters and its
disabled flag), not an argument of the call, so two threads that want different adapter sets must
never run on the UNet at once. `AdapterSwitch` is the gate: any number of holders that want the
adapter set the UNet has now run together (forward passes only read the weights); a holder that
wants another set waits until the UNet is idle, switches it (set_adapters / disable_adapters),
then runs. Waiting holders are served in arrival order, so a stream of calls with one set cannot
starve another set.

With every adapter disabled a PEFT LoRA layer calls its base layer alone, so a call without
adapters computes exactly what the UNet computed before any adapter was loaded.
"""
from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from diffmesh.errors import InvalidArgument
from diffmesh.models.photomaker import load_photomaker_lora, load_photomaker_lora_weights
from diffmesh.models.registry import ModelEntry, ModelError

# How often a holder waiting for the UNet looks at its cancel event (seconds).
CANCEL_POLL_S = 0.05

AdapterSet = tuple[str, ...]  # adapter names, sorted: one canonical order per set


def adapter_set(names: Sequence[str], known: Sequence[str], model_id: str) -> AdapterSet:
    """The canonical set a request names, checked against the adapters loaded for `model_id`:
    InvalidArgument("adapters", ...) for an unknown or repeated name."""
    seen: set[str] = set()
    for name in names:
        if name not in known:
            raise InvalidArgument("adapters", name, f"not an adapter loaded for {model_id}; known: "
                                                    f"{', '.join(sorted(known)) or '(none)'}")
        if name in seen:
            raise InvalidArgument("adapters", name, "named twice")
        seen.add(name)
    return tuple(sorted(seen))


def activate(unet: Any, adapters: AdapterSet) -> None:
    """Makes `adapters` the UNet's active set, each at weight 1 (PhotoMaker's LoRA scale);
    () disables every adapter (the plain UNet)."""
    if adapters:
        unet.set_adapters(list(adapters), [1.0] * len(adapters))
        unet.enable_adapters()
    else:
        unet.disable_adapters()


def attach_identity_adapter(model: Any, entry: ModelEntry) -> None:
    """An identity_encoder entry's LoRA (only the checkpoint's lora_weights: the encoder itself
    runs in the face stage) into its base pipeline's UNet (`model`, a UNetDenoiser), as the
    adapter named after the entry's registry id, disabled until a request names it. ModelError
    naming the entry and its path when the checkpoint cannot be read or does not fit the UNet."""
    weights = load_photomaker_lora_weights(entry.path)
    try:
        model.attach_adapter(entry.id, lambda unet: load_photomaker_lora(unet, weights, entry.id))
    except ModelError as exc:
        raise ModelError(f"identity encoder {entry.id!r} ({entry.path}) on {entry.base!r}: {exc}") from exc


class AdapterSwitch:
    """The adapter set a UNet runs with, shared by every thread that runs it (see the module
    docstring). `using(adapters)` holds the UNet with that set active for the body's forward
    passes; other holders of the same set may run at the same time, holders of other sets wait."""

    def __init__(self, unet: Any, apply: Callable[[Any, AdapterSet], None] = activate) -> None:
        self._unet = unet
        self._apply = apply
        self._cond = threading.Condition()
        self._active: AdapterSet | None = ()  # adapters are loaded disabled; None: unknown (a failed switch)
        self._users = 0
        self._waiting: deque[tuple[object, AdapterSet]] = deque()
        self.switches = 0  # how many times the set changed (for tests and metrics)

    @property
    def active(self) -> AdapterSet | None:
        return self._active

    def _may_enter(self, ticket: object, adapters: AdapterSet) -> bool:
        for other, wanted in self._waiting:
            if other is ticket:
                break
            if wanted != adapters:
                return False  # someone who wants another set came first
        return adapters == self._active or self._users == 0

    @contextmanager
    def using(self, adapters: AdapterSet, cancel: threading.Event | None = None,
              on_cancel: Callable[[], BaseException] | None = None) -> Iterator[None]:
        """The UNet with `adapters` active for the body. While waiting, a set `cancel` raises
        on_cancel() (or RuntimeError) and gives up the place in the queue."""
        ticket = object()
        with self._cond:
            self._waiting.append((ticket, adapters))
            try:
                while not self._may_enter(ticket, adapters):
                    if cancel is not None and cancel.is_set():
                        raise on_cancel() if on_cancel is not None else RuntimeError("cancelled")
                    self._cond.wait(CANCEL_POLL_S if cancel is not None else None)
            except BaseException:
                self._waiting.remove(next(item for item in self._waiting if item[0] is ticket))
                self._cond.notify_all()
                raise
            self._waiting.remove(next(item for item in self._waiting if item[0] is ticket))
            if adapters != self._active:
                # Only here with no holder: no forward pass is running on the UNet.
                self._active = None  # until the switch completes: a failed one is redone by the next holder
                self._apply(self._unet, adapters)
                self._active = adapters
                self.switches += 1
            self._users += 1
            self._cond.notify_all()  # later arrivals of the same set may join now
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()
