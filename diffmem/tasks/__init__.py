"""Benchmark tasks (see :mod:`diffmem.tasks.base`): the zoo, and a user's checkpoint with prompt lists."""

from diffmem.tasks import folder, zoo  # noqa: F401 - register the built-ins
from diffmem.tasks.base import TASKS, BenchTask, MemorizedPrompt, SplitSizes, TaskSplits, make_task

__all__ = ["TASKS", "BenchTask", "MemorizedPrompt", "SplitSizes", "TaskSplits", "make_task"]
