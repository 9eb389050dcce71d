"""Benchmark tasks (see :mod:`diffmem.tasks.base`): the two zoos, and a user's checkpoint with prompt lists."""

from diffmem.tasks import folder, zoo, zoo_sd  # noqa: F401 - register the built-ins
from diffmem.tasks.base import TASKS, BenchTask, MemorizedPrompt, SplitSizes, TaskSplits, make_task

__all__ = ["TASKS", "BenchTask", "MemorizedPrompt", "SplitSizes", "TaskSplits", "make_task"]
