"""Every registered method × mask: the command line writes what the Python API computes.

The API and the command line resolve a method through the same registry
(:func:`gradfix.methods.resolve_method`), mask through the same path (:mod:`gradfix.masking`), and
merge honours the gate threshold.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import _assert_written, _library_inputs, _transport_args, models  # noqa: F401  (fixture)

from gradfix import TaskVector, mask_task_vector
from gradfix.cli.main import main
from gradfix.errors import ConfigError
from gradfix.io import load_state_dict
from gradfix.jobs import MaskSettings, VoteSettings, transport_checkpoints
from gradfix.merge import merge_then_mask
from gradfix.methods import METHODS, get_method, resolve_method
from gradfix.ops.masks import MASKS

ALPHA = 0.7
THRESHOLD = 0.2


def _expected(m: dict[str, Path], tau: TaskVector, votes, mask: str) -> dict[str, torch.Tensor]:
    masked = mask_task_vector(tau, votes, mask, seed=0, threshold=THRESHOLD)
    return masked.apply_to(load_state_dict(m["B"]), ALPHA)


@pytest.mark.parametrize("mask", list(MASKS))
def test_gradfix_with_every_mask_writes_the_library_result(models, tmp_path, mask) -> None:  # noqa: F811
    out = tmp_path / mask
    args = _transport_args(models, out, "--method", "gradfix", "--mask", mask, "--threshold", str(THRESHOLD))
    assert main(args) == 0
    record = json.loads((out / "gradfix.json").read_text())
    assert (record["method"], record["mask"], record["threshold"]) == ("gradfix", mask, THRESHOLD)
    tau, _, _, _, votes = _library_inputs(models)
    _assert_written(out, _expected(models, tau, votes, mask))


@pytest.mark.parametrize("method", [name for name, m in METHODS.items() if m.aligns])
@pytest.mark.parametrize("mask", ["none", "agreement"])
def test_aligned_methods_write_the_library_result(models, tmp_path, method, mask) -> None:  # noqa: F811
    out = tmp_path / f"{method}-{mask}"
    assert main(_transport_args(models, out, "--method", method, "--mask", mask)) == 0
    tau, model_b, recipe, drawn, votes = _library_inputs(models)
    if getattr(get_method(method), "uses_activations", False):  # --data given: from activations
        from gradfix.data import batched
        from gradfix.methods.theseus import theseus_from_models
        from gradfix.recipes import load_recipe

        model_a, _ = load_recipe("text-zero-shot", models["A"], recipe.labels)
        batches = [recipe.collate(chunk) for chunk in batched(drawn, 8)]  # one tokenizer for both

        def forward(model, batch):
            return model(**{k: v for k, v in batch.items() if k != "labels"})

        aligned = theseus_from_models(tau, model_a, model_b, batches, forward_fn=forward)
    else:
        aligned = get_method(method).align(tau, models["A"], models["B"])
    expected = mask_task_vector(aligned, votes, mask).apply_to(load_state_dict(models["B"]), ALPHA)
    _assert_written(out, expected)


def test_naive_from_python_applies_no_mask_and_equals_the_command_line(models, tmp_path) -> None:  # noqa: F811
    api, cli = tmp_path / "api", tmp_path / "cli"
    settings = VoteSettings(data=str(models["few"]), progress=False)
    record = transport_checkpoints(
        models["A"],
        models["A-ft"],
        models["B"],
        api,
        settings,
        MaskSettings(alpha=ALPHA, exclude=["pooler.*"]),
        method="naive",
    )
    assert record["mask"] == "none" and record["num_samples"] == 0 and record["descent"] is None
    assert all(v == 1.0 for v in record["kept_fraction"].values())
    tau = TaskVector.from_checkpoints(models["A"], models["A-ft"], exclude="pooler.*")
    _assert_written(api, tau.apply_to(load_state_dict(models["B"]), ALPHA))
    assert main(_transport_args(models, cli, "--method", "naive")) == 0
    api_sd, cli_sd = load_state_dict(api), load_state_dict(cli)
    assert all(torch.equal(api_sd[n], cli_sd[n]) for n in api_sd)


def test_the_api_resolves_methods_as_the_command_line_does() -> None:
    assert resolve_method(None, MaskSettings())[0].name == "adaptive"
    method, masking = resolve_method(None, MaskSettings(mask="forcing"))
    assert method.name == "gradfix" and masking.mask == "forcing" and masking.alpha == 1.0
    method, masking = resolve_method("adaptive", MaskSettings())
    assert masking.mask == "gate" and masking.alpha == "auto"
    assert resolve_method("gradfix", MaskSettings())[1].mask == "agreement"
    for name in ("transfusion", "theseus", "naive"):
        assert resolve_method(name, MaskSettings())[1].mask == "none"
    with pytest.raises(ConfigError, match="--method naive"):
        resolve_method("naive", MaskSettings(mask="agreement"))
    with pytest.raises(ConfigError, match="--alpha auto"):
        resolve_method("naive", MaskSettings(alpha="auto"))
    with pytest.raises(ConfigError, match="unknown method 'bogus'"):
        resolve_method("bogus", MaskSettings())


def test_the_command_line_lists_the_registries(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["transport", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, method in METHODS.items():
        assert name in text and method.summary.split(",")[0] in text
    for name in MASKS:
        assert name in text


def _merge_args(m: dict[str, Path], out: Path, threshold: str) -> list[str]:
    return [
        "merge", "--source-base", str(m["A"]), "--source-finetuned", str(m["A-ft"]),
        "--source-finetuned", str(m["A-ft2"]), "--target-base", str(m["B"]), "--data", str(m["few"]),
        "--pipeline", "merge-then-mask", "--method", "task_arithmetic", "--mask", "gate",
        "--threshold", threshold, "--exclude", "pooler.*", "--out", str(out), "--no-progress",
    ]  # fmt: skip


def test_merge_honours_the_gate_threshold(models, tmp_path) -> None:  # noqa: F811
    outputs = {}
    for threshold in ("0", "0.95"):
        out = tmp_path / f"t{threshold}"
        assert main(_merge_args(models, out, threshold)) == 0
        assert json.loads((out / "gradfix.json").read_text())["threshold"] == float(threshold)
        outputs[threshold] = load_state_dict(out)
    assert any(not torch.equal(outputs["0"][n], outputs["0.95"][n]) for n in outputs["0"])
    tau, _, _, _, votes = _library_inputs(models)
    tau2 = TaskVector.from_checkpoints(models["A"], models["A-ft2"], exclude="pooler.*")
    merged = merge_then_mask(
        [tau, tau2], [votes, votes], mask="gate", method="task_arithmetic", mask_options={"threshold": 0.95}
    )
    _assert_written(tmp_path / "t0.95", merged.apply_to(load_state_dict(models["B"]), 1.0))
