"""Which task a name, a task file or an inline definition means: GLUE's table (``glue.py``) or a user task
(``task_file.py``). Every command finds its task here."""

from __future__ import annotations

import json
from typing import Optional, Union

from squat_cli import glue
from squat_cli.errors import DataError
from squat_cli.glue import GlueTask
from squat_cli.task_file import TaskSpec, looks_like_file, read_spec_file, task_from_spec, user_task


def get_task(ref: Union[str, TaskSpec, dict]) -> GlueTask:
    """A GLUE name (``rte``), a task file (``my-task.yaml``), an inline definition, or the name of a user task
    already met in this process."""
    if isinstance(ref, TaskSpec):
        return task_from_spec(ref)
    if isinstance(ref, dict):
        from squat_cli.task_file import spec_from_dict

        return task_from_spec(spec_from_dict(ref))
    key = str(ref).strip().lower()
    if glue._ALIASES.get(key, key) in glue.TASKS:
        return glue.get_task(key)
    known = user_task(str(ref))
    if known is not None:
        return known
    if looks_like_file(str(ref)):
        return task_from_spec(read_spec_file(ref))
    raise DataError(f"unknown task {ref!r}; choose one of: {', '.join(glue.TASKS)}, or give a task file (.yaml)")


def task_ref(ref: Union[str, TaskSpec, dict]) -> Union[str, dict]:
    """What a recipe's ``data.task`` holds for ``ref``: a GLUE name, or a user task's whole definition."""
    task = get_task(ref)
    if task.spec is None:
        return task.name
    return json.loads(task.spec)


def lookup(name: str) -> Optional[GlueTask]:
    """The task of a run folder's name: GLUE's, or a user task met in this process (None otherwise)."""
    return glue.TASKS.get(name) or user_task(name)


def task_of_run(run) -> Optional[GlueTask]:
    """A run's task: by its folder's name, else from the definition its recipe stores (user tasks)."""
    known = lookup(run.task)
    if known is not None:
        return known
    from squat_cli.errors import SquatError
    from squat_cli.recipe import recipe_from_dict
    from squat_cli.yaml_safe import read_yaml

    try:
        task = recipe_from_dict(read_yaml(run.recipe_file)).data.task
        return task_from_spec(task) if isinstance(task, TaskSpec) else None
    except SquatError:
        return None


def task_name(ref: Union[str, TaskSpec, dict]) -> str:
    if isinstance(ref, TaskSpec):
        return ref.name
    if isinstance(ref, dict) and "name" in ref:
        return str(ref["name"])
    return get_task(ref).name
