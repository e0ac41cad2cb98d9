"""Running a move between hosts (plan/moves.py): each step on its host's executor, the copies
through libvirt's storage streams (host/transfer.py).

A step that fails ends the move there; what was done stays done, and the next plan picks the
move up from where it stopped (see plan/moves.py for why the VM is always whole somewhere).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import ApplyError
from ..host.transfer import copy_volume, volume_digest
from ..plan.steps import CopyVolume, MoveStep, OnHost, VerifyCopy
from ..plan.types import Change
from ..units import format_size
from . import ChangeResult, Progress, run_steps
from .executor import Executor


def run_move(change: Change, executors: Mapping[str, Executor],
             progress: Progress | None) -> ChangeResult:
    return run_steps(change, change.move_steps, lambda step: _run(step, executors), progress)


def _run(step: MoveStep, executors: Mapping[str, Executor]) -> str:
    if isinstance(step, OnHost):
        return executors[step.host].run(step.step)
    if isinstance(step, CopyVolume):
        digest = copy_volume(executors[step.from_host].hv, step.pool, step.volume,
                             executors[step.to_host].hv, step.to_pool, step.xml)
        return (f"copied {step.volume} from {step.from_host} to {step.to_host} "
                f"({format_size(digest.length_bytes)}, sha256 {digest.sha256[:12]}, verified)")
    if isinstance(step, VerifyCopy):
        here = volume_digest(executors[step.from_host].hv, step.pool, step.volume)
        there = volume_digest(executors[step.to_host].hv, step.to_pool, step.volume)
        if (here.length_bytes, here.sha256) != (there.length_bytes, there.sha256):
            raise ApplyError(
                f"{step.volume} on {step.from_host} and its copy on {step.to_host} differ "
                f"({format_size(here.length_bytes)} sha256 {here.sha256[:12]} against "
                f"{format_size(there.length_bytes)} sha256 {there.sha256[:12]}): the original "
                "is kept; decide which one holds the data and delete the other by hand")
        return f"the copy of {step.volume} on {step.to_host} verified"
    raise AssertionError(f"unknown move step {step!r}")
