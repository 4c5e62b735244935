"""The curated public API of ``gradfix``: every name resolves and none shadows a submodule."""

from __future__ import annotations

import importlib
import pkgutil

import gradfix


def test_every_public_name_resolves_and_none_is_a_submodule_name() -> None:
    submodules = {m.name for m in pkgutil.iter_modules(gradfix.__path__)}
    assert {"masking", "methods", "votes", "ops", "io", "jobs", "merge"} <= submodules
    for name in gradfix.__all__:
        assert getattr(gradfix, name) is not None, name
        assert name not in submodules, f"gradfix.{name} would shadow the submodule"


def test_submodules_stay_modules_after_the_package_is_imported() -> None:
    import gradfix.masking

    assert gradfix.masking.mask_task_vector is gradfix.mask_task_vector
    merge = importlib.import_module("gradfix.merge")
    assert gradfix.merge is merge and gradfix.merge_task_vectors is merge.merge_task_vectors


def test_lazy_names_come_from_their_modules() -> None:
    from gradfix.jobs import transport_checkpoints

    assert gradfix.transport_checkpoints is transport_checkpoints
    try:
        gradfix.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")
