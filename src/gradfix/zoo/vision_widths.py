"""The cross-width vision scenario: A is vision-independent's CNN (width 32), B a narrower one (width 16).

Transport across widths: ``τ_A`` has other shapes than B's parameters, so it cannot be added to B
as it is; Theseus (:mod:`gradfix.methods.theseus`) maps it onto B's channels.

- A, its fine-tunes and the task data are *the same artifacts* as in ``vision-independent``
  (:func:`~gradfix.zoo.vision.vision_scenario`): same keys, so a cache that holds that scenario
  rebuilds none of them.
- B is a :class:`~gradfix.zoo.vision.SmallCNN` of width 16 (16, 32, 64 channels) with the same
  embedding width (128, so the class-prototype heads stay comparable), pre-trained exactly like
  vision-independent's B: the same half of Fashion-MNIST classes 0–4, the same settings and B's
  initialisation seed (which, at another width, draws another network). B-ft is B fine-tuned on
  each task through its own prototype head (the upper bound).

The new artifacts are named ``vision/B-w16`` and ``vision/B-w16-ft/<task>``; their recipes record
the width, so their keys differ from the width-32 ones.
"""

from __future__ import annotations

from dataclasses import replace

from gradfix.errors import ConfigError
from gradfix.zoo.cache import Artifact
from gradfix.zoo.scenario import Scenario
from gradfix.zoo.vision import VisionConfig, _build_base, _build_finetune, vision_scenario

WIDTH_B = 16


def vision_widths_scenario(
    name: str = "vision-widths", config: VisionConfig | None = None, width_b: int = WIDTH_B
) -> Scenario:
    """A = vision-independent's A (``config.width``), B = the same recipe at width ``width_b``."""
    config = config or VisionConfig()
    if width_b == config.width:
        raise ConfigError(f"width_b ({width_b}) must differ from A's width ({config.width})")
    source = vision_scenario("vision-independent", config)
    narrow = replace(config, width=width_b)
    data = source.entries["data"]
    entries: dict[str, Artifact] = {"data": data, "A": source.entries["A"]}
    recipe_b = dict(source.entries["B"].recipe)
    recipe_b["architecture"] = {"width": width_b, "dim": config.dim}
    tag = f"B-w{width_b}"
    entries["B"] = Artifact(
        f"vision/{tag}",
        "model",
        recipe_b,
        _build_base(narrow, "B"),
        summary=f"B: small CNN of width {width_b} pre-trained on half B of Fashion-MNIST classes 0-4",
    )
    for task in config.sizes:
        entries[f"A-ft/{task}"] = source.entries[f"A-ft/{task}"]
        entries[f"B-ft/{task}"] = Artifact(
            f"vision/{tag}-ft/{task}",
            "finetune",
            dict(source.entries[f"B-ft/{task}"].recipe),
            _build_finetune(narrow, task, "B"),
            deps={"base": entries["B"], "data": data},
            summary=f"B (width {width_b}) fine-tuned on {task}",
        )
    return Scenario(
        name=name,
        family="vision",
        summary=f"small CNNs of widths {config.width} (A) and {width_b} (B), pre-trained independently",
        entries=entries,
        tasks=tuple(config.sizes),
        real=source.real,
        built=f"B (width {width_b}) and its fine-tunes; A, A's fine-tunes and the data: vision-independent's",
        extra={"widths": {"A": config.width, "B": width_b}},
    )
