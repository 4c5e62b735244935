"""The scenario zoo: base-model pairs, task data and fine-tunes, built here reproducibly and cached.

Scenarios (``gradfix zoo list``):

- ``text-release-short`` / ``text-release-long``: A = all-MiniLM-L6-v2 (real), B = a later
  release of it built by short / long continued pre-training on Python's docstrings; three BBC
  News tasks (headline topic, sentence topic, headline-or-sentence).
- ``text-release-far``: B = A after masked-LM continued pre-training with a larger learning rate
  (another objective than A's; a head created for it): the far end of the drift axis.
- ``text-release-instruct``: B = A trained supervised on labelled tasks of its own, phrased as
  instructions (standard-library docstrings: package, docstring kind, same-module pairs), none of
  them an evaluation task: the analogue of an instruction-tuned release.
- ``text-release-permuted``: the short release's B with every layer's attention heads and FFN
  units permuted (the same function, coordinates not aligned with A's); the same tasks.
- ``text-narrow``: B = a narrower encoder (hidden 256, 8 heads, FFN 1024) initialised from A's
  units of largest activation variance and distilled from A's sentence embeddings on the
  docstrings: the cross-width text pair for Theseus.
- ``vision-independent``: two small CNNs pre-trained here from different seeds on different
  halves of Fashion-MNIST; three image tasks (new Fashion-MNIST classes, MNIST, digits).
- ``vision-widths``: the same A (width 32) and a B of width 16 pre-trained like the other B: the
  cross-width pair for Theseus.

``build(name)`` builds what is missing under the cache (``$GRADFIX_CACHE``, default
``~/.cache/gradfix``) and returns the scenario's folder; see :mod:`gradfix.zoo.cache`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from gradfix.errors import ConfigError
from gradfix.zoo.cache import ENV_VAR, Artifact, cache_root
from gradfix.zoo.scenario import MANIFEST, Scenario, build_scenario, scenario_status

__all__ = [
    "DEMO_SCENARIO",
    "DEMO_TASK",
    "ENV_VAR",
    "MANIFEST",
    "SCENARIOS",
    "Artifact",
    "Scenario",
    "build",
    "build_scenario",
    "cache_root",
    "get_scenario",
    "scenario_names",
    "scenario_status",
]

DEMO_SCENARIO = "text-release-short"
DEMO_TASK = "headlines"


def _text(name: str, level: str) -> Callable[[], Scenario]:
    def make() -> Scenario:
        from gradfix.zoo.text_scenarios import text_scenario

        return text_scenario(name, level)

    return make


def _permuted() -> Scenario:
    from gradfix.zoo.text_permuted import permuted_scenario

    return permuted_scenario("text-release-permuted", "short")


def _narrow() -> Scenario:
    from gradfix.zoo.text_narrow import narrow_scenario

    return narrow_scenario("text-narrow")


def _vision() -> Scenario:
    from gradfix.zoo.vision import vision_scenario

    return vision_scenario("vision-independent")


def _vision_widths() -> Scenario:
    from gradfix.zoo.vision_widths import vision_widths_scenario

    return vision_widths_scenario("vision-widths")


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "text-release-short": _text("text-release-short", "short"),
    "text-release-long": _text("text-release-long", "long"),
    "text-release-far": _text("text-release-far", "far"),
    "text-release-instruct": _text("text-release-instruct", "instruct"),
    "text-release-permuted": _permuted,
    "text-narrow": _narrow,
    "vision-independent": _vision,
    "vision-widths": _vision_widths,
}
"""Scenario name → a function that describes it (cheap: nothing is loaded or built)."""


def scenario_names() -> list[str]:
    """The registered scenario names."""
    return list(SCENARIOS)


def get_scenario(name: str) -> Scenario:
    """The registered scenario ``name``; :class:`ConfigError` names the known ones otherwise."""
    if name not in SCENARIOS:
        raise ConfigError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    return SCENARIOS[name]()


def build(
    name: str,
    root: str | Path | None = None,
    tasks: Iterable[str] | None = None,
    progress: bool = True,
) -> Path:
    """Build (or reuse) the registered scenario ``name`` and return its folder under the cache."""
    return build_scenario(get_scenario(name), root, tasks=tasks, progress=progress)
