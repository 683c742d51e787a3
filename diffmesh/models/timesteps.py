"""Custom timestep schedules: validation, and log-linear interpolation of anchor timesteps.

Pure Python (no torch, no gRPC). A custom schedule goes to the scheduler as
`set_timesteps(timesteps=[...])`, as diffusers' `retrieve_timesteps` does.
"""
from __future__ import annotations

import math
from typing import Sequence

from diffmesh.errors import InvalidArgument

# Face-detailing anchors: ten steps that spend most of the work at low noise, where identity
# detail is decided. Used as they are for 10 steps, interpolated for any other count.
FACE_DETAIL_ANCHORS: tuple[int, ...] = (999, 845, 730, 587, 443, 310, 193, 116, 53, 13)


def validate_timesteps(timesteps: Sequence[int], num_train_timesteps: int = 1000,
                       field: str = "timesteps") -> list[int]:
    """`timesteps` as a list of ints: non-empty, integral, strictly descending, each in
    [0, num_train_timesteps). InvalidArgument naming `field` otherwise."""
    values = list(timesteps)
    if not values:
        raise InvalidArgument(field, values, "must not be empty")
    out = []
    for index, value in enumerate(values):
        if isinstance(value, bool) or not float(value).is_integer():
            raise InvalidArgument(f"{field}[{index}]", value, "must be an integer")
        out.append(int(value))
    for index, value in enumerate(out):
        if not 0 <= value < num_train_timesteps:
            raise InvalidArgument(f"{field}[{index}]", value, f"must be in [0, {num_train_timesteps})")
        if index and value >= out[index - 1]:
            raise InvalidArgument(f"{field}[{index}]", value,
                                  f"must be below the previous timestep {out[index - 1]} (strictly descending)")
    return out


def max_interpolated_steps(anchors: Sequence[int] = FACE_DETAIL_ANCHORS) -> int:
    """The most steps `interpolate_timesteps` can give: every integer from the first anchor down
    to the last (987 for the face-detailing anchors)."""
    return int(anchors[0]) - int(anchors[-1]) + 1


def interpolate_timesteps(steps: int, anchors: Sequence[int] = FACE_DETAIL_ANCHORS,
                          num_train_timesteps: int = 1000) -> list[int]:
    """`steps` strictly descending integer timesteps following `anchors` log-linearly.

    The anchors sit at evenly spaced positions 0..1; step i sits at i / (steps - 1) and takes the
    piecewise-linear interpolation of log(t + 1) between its two neighbouring anchors, then
    exp(.) - 1, rounded. With steps == len(anchors) the anchors come back unchanged; one step
    gives [anchors[0]].

    Rounding collides where the schedule is dense in t (its low-noise end, at large step counts).
    Duplicates are resolved by walking from the last (smallest) timestep up and raising each value
    to at least one above its successor; where that pushes past the first anchor, values are
    capped from the top (t_i <= anchors[0] - i). Both end anchors are always kept, so at most
    anchors[0] - anchors[-1] + 1 steps are representable; more is InvalidArgument('steps').
    """
    anchors = validate_timesteps(anchors, num_train_timesteps, field="anchors")
    limit = max_interpolated_steps(anchors)
    if not 1 <= steps <= limit:
        raise InvalidArgument("steps", steps,
                              f"must be in [1, {limit}] to interpolate {len(anchors)} anchors from "
                              f"{anchors[0]} to {anchors[-1]} without repeating a timestep")
    if steps == 1:  # also the only count a single anchor allows
        return [anchors[0]]
    logs = [math.log(a + 1.0) for a in anchors]
    segments = len(anchors) - 1
    raw = []
    for i in range(steps):
        position = i * segments / (steps - 1)  # in anchor units: 0 .. segments
        left = min(int(position), segments - 1)
        frac = position - left
        value = math.exp(logs[left] + (logs[left + 1] - logs[left]) * frac) - 1.0
        raw.append(int(round(value)))
    raw[0], raw[-1] = anchors[0], anchors[-1]  # exact ends, whatever exp/log rounding did
    for i in range(steps - 2, -1, -1):  # duplicates: push up from the fine end
        raw[i] = max(raw[i], raw[i + 1] + 1)
    return [min(value, anchors[0] - i) for i, value in enumerate(raw)]  # and cap from the top

