"""Tasks, prompt templates, validated loading and client partitioning for fedsteer."""

from fedsteer.data.errors import DataError
from fedsteer.data.loading import load_examples
from fedsteer.data.partition import label_counts, partition
from fedsteer.data.schema import Example, Task, TaskSpec
from fedsteer.data.tasks import BUILTIN_SPECS, builtin_task_names, load_task, task_from_spec

__all__ = [
    "BUILTIN_SPECS",
    "DataError",
    "Example",
    "Task",
    "TaskSpec",
    "builtin_task_names",
    "label_counts",
    "load_examples",
    "load_task",
    "partition",
    "task_from_spec",
]
