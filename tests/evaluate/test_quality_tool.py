"""``tools/quality.py``: the simple baselines each recipe is held to, the verdict, and the README table it rewrites."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sqdeploy.quantize.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_tool", ROOT / "tools" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_dir(tmp_path: Path, arch: str) -> Path:
    (tmp_path / arch).mkdir()
    (tmp_path / arch / "config.json").write_text(json.dumps({"architectures": [arch]}))
    return tmp_path / arch


def test_baselines_follow_the_family_and_keep_the_recipe_otherwise(quality, tmp_path):
    llama, opt = model_dir(tmp_path, "LlamaForCausalLM"), model_dir(tmp_path, "OPTForCausalLM")
    b = quality.baselines("w8a8-sq", llama)
    smoothed = load_recipe(b[quality.ALPHA_05])
    assert smoothed.smoothing_groups == ("attn_norm->q/k/v", "mlp_norm->gate/up", "up->down")
    assert smoothed.params["alpha"] == 0.5 and load_recipe(b[quality.NO_SMOOTHING]).params["alpha"] is None
    recipe = load_recipe("w8a8-sq")
    for spec in b.values():  # only the smoothing differs from the recipe
        other = load_recipe(spec)
        assert other.scheme == recipe.scheme and other.params["rounding"] == recipe.params["rounding"]
        assert other.params["gptq_act_order"] == recipe.params["gptq_act_order"]
    assert "mlp_norm->up" in load_recipe(quality.baselines("w8a8-sq", opt)[quality.ALPHA_05]).smoothing_groups
    assert quality.baselines("w4a16-sqplus", llama) == {"round to nearest": "w4a16-rtn"}
    # fixed-alpha and weight-only recipes have no smoothing to search: nothing to hold them to
    assert quality.baselines("w8a8-sq-o1", llama) == {} and quality.baselines("w8a16-rtn", llama) == {}


def row(recipe: str, ppl: float, nll: list[float]) -> dict:
    return {"recipe": recipe, "resolved": {}, "standard": {"perplexity": ppl, "per_window_nll": nll}}


def test_verdict_is_no_when_any_baseline_is_better_and_the_readme_block_is_rewritten(quality, tmp_path):
    base = {quality.NO_SMOOTHING: "r:alpha=null", quality.ALPHA_05: "r:alpha=0.5"}
    done = {("llama", None): {"recipe": "float32 (unquantized)", "standard": {"perplexity": 7.0, "per_window_nll": [2.0, 1.9]}},
            ("llama", "w8a8-sq"): row("w8a8-sq", 7.2, [2.02, 1.93]),
            ("llama", "r:alpha=null"): row("r:alpha=null", 7.5, [2.05, 1.96]),
            ("llama", "r:alpha=0.5"): row("r:alpha=0.5", 7.1, [2.01, 1.92])}
    rows = quality.assemble("llama", ["w8a8-sq", "r:alpha=null", "r:alpha=0.5"], done, {"w8a8-sq": base})
    std = rows[1]["standard"]
    assert std["never_worse"] is False and set(std["vs_baselines"]) == set(base)
    assert std["vs_baselines"][quality.ALPHA_05]["change"]["relative"] > 0
    done[("llama", "r:alpha=0.5")] = row("r:alpha=0.5", 7.3, [2.03, 1.94])
    rows = quality.assemble("llama", ["w8a8-sq", "r:alpha=null", "r:alpha=0.5"], done, {"w8a8-sq": base})
    assert rows[1]["standard"]["never_worse"] is True
    data = {"command": "c", "commit": {"commit": "0" * 40, "dirty": False}, "date": "d", "complete": True,
            "machine": {"cpu": "cpu", "cores": 2, "torch": "t"}, "references": "none",
            "settings": {"standard_windows": 2, "validation_windows": 0}, "humaneval": {"run": False},
            "models": {"llama": {"rows": rows}}}
    assert "at most the best baseline" in quality.markdown(data)
    readme = tmp_path / "README.md"
    start, end = quality.README_MARKERS
    readme.write_text(f"# x\n\nkept above\n{start}\nold table\n{end}\nkept below\n")
    quality.update_readme(readme, data)
    text = readme.read_text()
    assert "old table" not in text and "kept above" in text and "kept below" in text
    table = text.split(start)[1].split(end)[0]
    assert "7.2000 (+2.53%" in table and table.count("yes") == 1
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="no quality-table markers"):
        quality.update_readme(readme, data)
    assert readme.read_text() == "no markers"


def test_reference_rows_join_the_readme_table(quality):
    base = {"recipe": "float32 (unquantized)", "standard": {"perplexity": 7.0, "per_window_nll": [2.0, 1.9]}}
    ref = {"recipe": "modelopt:int4-awq", "reference": "NVIDIA ModelOpt 0.47.0",
           "standard": {"perplexity": 7.3, "per_window_nll": [2.05, 1.95]}}
    done = {("llama", None): base, ("llama", "modelopt:int4-awq"): ref}
    rows = quality.assemble("llama", ["modelopt:int4-awq"], done)
    table = quality.readme_table({"models": {"llama": {"rows": rows}}})
    assert "NVIDIA ModelOpt 0.47.0 int4-awq (reference) | 7.3000 (+" in table.replace("  ", "")
