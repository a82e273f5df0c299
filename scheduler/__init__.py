"""Continuous batching: request states, admission, chunked prefill, preemption.

The scheduler knows block counts (through `kv_manager`), never tensors.
"""

from scheduler.output import ScheduledChunk, SchedulerOutput, SlotCut
from scheduler.pressure import Squeezer
from scheduler.request import Request, RequestStatus
from scheduler.scheduler import Scheduler, SchedulerConfig

__all__ = [
    "Request",
    "RequestStatus",
    "ScheduledChunk",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SlotCut",
    "Squeezer",
]
