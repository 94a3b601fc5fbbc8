"""The cost/benefit view across studies (`fw_trainer.study.cost_benefit`) from hand-written aggregations, checked
against scipy and a frontier found by hand."""

import csv
import json
from pathlib import Path

import pytest
import yaml
from scipy import stats

from fw_trainer.study.cost_benefit import frontier, main, read_spec


REPO = Path(__file__).resolve().parents[1]


def group(task, method, seeds, final, adapter_params=100, per_run=None):
    mean = sum(final) / len(final)
    row = {
        "group": {"task": task, "method": method},
        "name": f"{task}/{method}",
        "task_name": task,
        "metric_name": "accuracy",
        "seeds": seeds,
        "final": final,
        "final_metric": {"n": len(final), "mean": mean, "std": None, "ci_low": mean - 0.01, "ci_high": mean + 0.01},
        "adapter_params": adapter_params,
    }
    if per_run is not None:
        row["train_time"] = {
            "per_run": [{"seed": s, "seconds": t, "disturbed": d} for s, t, d in per_run],
            "undisturbed": {},
        }
    return row


@pytest.fixture
def spec(tmp_path):
    """Part B-like cells in one aggregation (no per-run times), a new variant in another, times from a third."""
    old = {
        "groups": [
            group("sst2", "lora", ["0", "1", "2"], [0.80, 0.82, 0.84]),
            group("sst2", "fw", ["0", "1", "2"], [0.81, 0.85, 0.86]),
        ]
    }
    new = {
        "parts": {
            "variants": {
                "groups": [
                    group("sst2", "dora", ["0", "1"], [0.83, 0.86], 110, [("0", 120.0, False), ("1", 124.0, False)])
                ]
            }
        }
    }
    times = {
        "groups": [
            group("sst2", "lora", ["0", "1"], [0.80, 0.82], 100, [("0", 100.0, False), ("1", 130.0, True)]),
            group("sst2", "fw", ["0"], [0.81], 100, [("0", 110.0, False)]),
        ]
    }
    paths = {}
    for name, document in {"old": old, "new": new, "times": times}.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(document))
    spec = {
        "output_dir": str(tmp_path / "out"),
        "metrics": [str(paths["old"]), str(paths["new"])],
        "train_time": [str(paths["times"]), str(paths["new"])],
        "comparisons": [["fw", "lora"], ["dora", "lora"]],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_cells_costs_frontiers_and_paired_comparisons(spec, tmp_path):
    assert main([str(spec)]) == 0
    out = tmp_path / "out"
    rows = {row["method"]: row for row in csv.DictReader((out / "cost_benefit.csv").open())}
    # Costs: the undisturbed runs of the `train_time` aggregations only (LoRA's seed 1 was disturbed).
    assert (rows["lora"]["train_time_runs"], rows["lora"]["train_time_median_s"]) == ("1", "100.0")
    assert (rows["fw"]["train_time_min_s"], rows["dora"]["train_time_median_s"]) == ("110.0", "122.0")
    # By hand: means 0.82 (lora), 0.84 (fw), 0.845 (dora). Parameters 100, 100, 110: fw dominates LoRA (same count,
    # higher metric); dora costs more for more. Time 100, 110, 122: each costs more for more, none is dominated.
    assert {m for m, r in rows.items() if r["frontier_params"] == "True"} == {"fw", "dora"}
    assert {m for m, r in rows.items() if r["frontier_time"] == "True"} == {"lora", "fw", "dora"}
    tests = {(t["a"], t["b"]): t for t in json.loads((out / "comparisons.json").read_text())["tests"]}
    fw, dora = tests["fw", "lora"], tests["dora", "lora"]
    assert fw["seeds"] == ["0", "1", "2"] and dora["seeds"] == ["0", "1"]  # the seeds both sides have
    p_fw = stats.ttest_rel([0.81, 0.85, 0.86], [0.80, 0.82, 0.84]).pvalue
    p_dora = stats.ttest_rel([0.83, 0.86], [0.80, 0.82]).pvalue
    assert fw["t_pvalue"] == pytest.approx(p_fw) and dora["t_pvalue"] == pytest.approx(p_dora)
    # Holm over the two: the smaller p doubled, the larger kept (at least the first's adjusted value).
    small, large = sorted([p_fw, p_dora])
    adjusted = {p_fw: None, p_dora: None}
    adjusted[small], adjusted[large] = min(1, 2 * small), max(min(1, 2 * small), large)
    assert fw["t_pvalue_holm"] == pytest.approx(adjusted[p_fw])
    assert dora["t_pvalue_holm"] == pytest.approx(adjusted[p_dora])
    table = (out / "cost_benefit.md").read_text()
    assert "| sst2 | dora | 2 | 0.8450 |" in table and "120–124 (2 runs)" in table
    assert (out / "figures" / "pareto_sst2.png").stat().st_size > 1000


def test_a_point_without_a_cost_is_on_no_frontier():
    assert frontier({"a": (0.9, None), "b": (0.8, 10.0), "c": (0.8, 12.0)}) == {"b"}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update(metrics=s["metrics"] + [s["train_time"][0]]), "The cell sst2/lora is in"),
        (lambda s: s.update(metrics=s["metrics"][0]), "`metrics` should be a list"),
        (lambda s: s.update(comparisons=[["fw", "adalora"]]), "name method(s) no aggregation holds: ['adalora']"),
        (lambda s: s.update(train_time=[s["metrics"][0]]), "holds no per-run train times"),
        (lambda s: s.update(typo=1), "unknown key(s) ['typo']"),
    ],
)
def test_bad_cost_benefit_files(spec, change, message, capsys):
    content = yaml.safe_load(spec.read_text())
    change(content)
    spec.write_text(yaml.safe_dump(content))
    assert main([str(spec), "--no_figures"]) == 2
    assert message in capsys.readouterr().err


def test_a_pair_without_a_common_seed_is_an_error(spec, tmp_path, capsys):
    """Cells of two studies with other seeds (Part B's 0-4 and the confirmatory study's 10-24) cannot be paired."""
    content = yaml.safe_load(spec.read_text())
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"groups": [group("sst2", "late", ["10", "11"], [0.9, 0.91])]}))
    content.update(metrics=content["metrics"] + [str(other)], comparisons=[["late", "lora"]])
    spec.write_text(yaml.safe_dump(content))
    assert main([str(spec), "--no_figures"]) == 2
    assert "The comparison late − lora on sst2 has no seed on both sides" in capsys.readouterr().err


def test_a_combined_aggregation_lists_a_cell_its_parts_share_once(spec, tmp_path):
    """Part A's LoRA runs are Part B's too: a combined file holds them in both parts, and they are one cell."""
    lora = group("sst2", "lora", ["0", "1", "2"], [0.80, 0.82, 0.84])
    fw = group("sst2", "fw", ["0", "1", "2"], [0.81, 0.85, 0.86])
    combined = tmp_path / "combined.json"
    combined.write_text(json.dumps({"parts": {"part_a": {"groups": [lora]}, "part_b": {"groups": [lora, fw]}}}))
    content = yaml.safe_load(spec.read_text())
    content["metrics"][0] = str(combined)
    spec.write_text(yaml.safe_dump(content))
    assert main([str(spec), "--no_figures"]) == 0
    rows = list(csv.DictReader((tmp_path / "out" / "cost_benefit.csv").open()))
    assert sorted(row["method"] for row in rows) == ["dora", "fw", "lora"]
    # Two different cells under one name are refused.
    changed = dict(lora, final=[0.7, 0.7, 0.7])
    combined.write_text(json.dumps({"parts": {"part_a": {"groups": [changed]}, "part_b": {"groups": [lora, fw]}}}))
    assert main([str(spec), "--no_figures"]) == 2


def test_a_comparison_of_one_seed_has_no_statistics_but_a_row(spec, tmp_path):
    content = yaml.safe_load(spec.read_text())
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"groups": [group("sst2", "single", ["0"], [0.9])]}))
    content.update(metrics=content["metrics"] + [str(one)], comparisons=[["single", "lora"]])
    spec.write_text(yaml.safe_dump(content))
    assert main([str(spec), "--no_figures"]) == 0
    table = (tmp_path / "out" / "cost_benefit.md").read_text()
    assert "| sst2 | single − lora | 1 | +0.1000 | – | – | – | – | – | – | – |" in table


@pytest.mark.parametrize("path", sorted(REPO.glob("configs/cost_benefit/*.yaml")), ids=lambda p: p.stem)
def test_every_committed_cost_benefit_file_parses(path):
    spec = read_spec(str(path))
    assert spec["comparisons"] and spec["metrics"]
