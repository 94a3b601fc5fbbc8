"""Aggregation of a study from fabricated run directories, checked against values computed by hand."""

import json
import math
import time

import pytest
import yaml
from scipy import stats

from fw_trainer.glue.completion import RUN_COMPLETE_FILE, write_completion
from fw_trainer.study.aggregate import aggregate_study, main
from fw_trainer.study.capacity import capacity_comparisons
from fw_trainer.study.comparisons import significance_tests
from fw_trainer.study.config import StudyConfig
from fw_trainer.study.figures import FROZEN_MARK_LABEL, train_time_figure, training_curves_figure
from fw_trainer.study.run_metrics import METRICS_FILE, collect_run_metrics
from fw_trainer.study.statistics import minimum_detectable_difference


LABELS = [0, 1] * 5
FINAL = {"lora": [0.80, 0.82, 0.84], "fw": [0.81, 0.85, 0.86]}
NAMES = [f"bert.encoder.layer.{i}.{role}" for i in range(2) for role in ("attention.self.query", "output.dense")]
# How much of LoRA's ‖ΔW_m‖ each FW-LoRA run keeps, per matrix: against the Fisher proxy's order 1 < 2 < 3 < 4 the
# ranks are 1, 3, 2, 4 on seeds 0 and 1 (ρ = 1 − 6 · 2 / (4 · 15) = 0.8) and reversed on seed 2 (ρ = −1).
KEPT = {0: [0.5, 0.7, 0.6, 0.9], 1: [0.5, 0.7, 0.6, 0.9], 2: [0.9, 0.7, 0.6, 0.5]}


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def predictions(method: str, seed: int) -> list[int]:
    """Dev predictions: on seed 0, FW-LoRA alone is right on examples 0-2 and LoRA alone on example 3."""
    wrong = {("lora", 0): {0, 1, 2}, ("fw", 0): {3}}.get((method, seed), {seed})
    return [1 - label if i in wrong else label for i, label in enumerate(LABELS)]


def fabricate_run(run_dir, method: str, seed: int) -> None:
    """The files `run_glue_fw.py` leaves in a finished run directory."""
    final = FINAL[method][seed]
    write_json(
        run_dir / "all_results.json",
        {
            "eval_accuracy": final,
            "train_runtime_total": 100.0 + 10 * seed + (5 if method == "fw" else 0),
            "train_segments": 1,
            "train_peak_memory_mb": 1000.0 + seed,
            "train_peak_memory_kind": "cpu_max_rss",
        },
    )
    history = [
        {"step": 10, "epoch": 0.5, "loss": 0.7, "task_loss": 0.69},
        {"step": 10, "epoch": 0.5, "eval_accuracy": 0.6},
        {"step": 20, "epoch": 1.0, "loss": 0.5, "task_loss": 0.49},
        {"step": 20, "epoch": 1.0, "eval_accuracy": final + 0.01},
        {"step": 30, "epoch": 1.5, "eval_accuracy": final},
    ]
    write_json(run_dir / "trainer_state.json", {"log_history": history})
    write_json(run_dir / "adapter_summary.json", {"method": method, "adapter_params": 1234, "model_type": "bert"})
    kept = KEPT[seed] if method == "fw" else [1.0] * len(NAMES)
    norms = {name: (1.0 + i + seed) * kept[i] for i, name in enumerate(NAMES)}
    write_json(run_dir / "delta_weight_norms.json", norms)
    if method == "fw":
        write_importance_file(run_dir, 4, [(i + 1) / 10 for i in range(len(NAMES))])
    rows = [f"{i}\t{label}\t{pred}" for i, (label, pred) in enumerate(zip(LABELS, predictions(method, seed)))]
    (run_dir / "eval_predictions_sst2.tsv").write_text("index\tlabel\tprediction\n" + "\n".join(rows) + "\n")
    write_completion(str(run_dir), ["train", "eval"])  # what the script writes last


def write_importance_file(run_dir, frozen_at_step: int, importances: list[float]) -> None:
    """`fw_importance.json` of a frozen warm-up (`max` normalisation, power 1: the weight is 1 − I)."""
    modules = {
        name: {"fisher": 2.0 * importance, "importance": importance, "penalty_weight": 1.0 - importance}
        for name, importance in zip(NAMES, importances)
    }
    write_json(run_dir / "fw_importance.json", {"frozen": True, "frozen_at_step": frozen_at_step, "modules": modules})


@pytest.fixture
def study(tmp_path):
    spec = {
        "output_dir": str(tmp_path / "out"),
        "results_dir": str(tmp_path / "results"),
        "args": {"task_name": "sst2"},
        "axes": {"method": {"lora": {"method": "lora"}, "fw": {"method": "fw_lora"}}, "seed": [0, 1, 2]},
        "comparisons": {"axis": "method", "pairs": [["fw", "lora"]]},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    config = StudyConfig.from_yaml(str(path))
    for run in config.runs():
        run_dir = tmp_path / "out" / run.name
        fabricate_run(run_dir, run.labels["method"], int(run.labels["seed"]))
        extra = {"run": run.name, "labels": run.labels, "args": run.args}
        write_json(run_dir / METRICS_FILE, collect_run_metrics(str(run_dir), "sst2", extra))
    return config


def test_run_metrics_from_a_run_directory(study, tmp_path):
    metrics = json.loads((tmp_path / "out" / "fw" / "seed1" / METRICS_FILE).read_text())
    assert metrics["metric_name"] == "accuracy"
    assert metrics["final_metric"] == 0.85 and metrics["best_metric"] == pytest.approx(0.86)
    assert metrics["best_step"] == 20
    assert [e["loss"] for e in metrics["train_loss_history"]] == [0.69, 0.49]  # the task loss, not loss + penalty
    assert metrics["importances"][NAMES[3]] == pytest.approx(0.4)
    assert metrics["fisher"][NAMES[3]] == pytest.approx(0.8) and metrics["penalty_weights"][NAMES[3]] == 0.6
    assert metrics["eval_predictions"] == ["eval_predictions_sst2.tsv"]


def test_aggregated_metrics_and_significance_by_hand(study, tmp_path):
    written = aggregate_study(study)
    results = tmp_path / "results"
    groups = {g["name"]: g for g in json.loads((results / "aggregated_metrics.json").read_text())["groups"]}
    assert set(groups) == {"lora", "fw"}
    lora = groups["lora"]
    assert lora["seeds"] == ["0", "1", "2"] and lora["final"] == FINAL["lora"]
    assert lora["final_metric"]["mean"] == pytest.approx(0.82)
    assert lora["final_metric"]["std"] == pytest.approx(0.02)
    half_width = 4.302653 * 0.02 / math.sqrt(3)  # t_{0.975, 2}
    assert lora["final_metric"]["ci_low"] == pytest.approx(0.82 - half_width, rel=1e-5)
    assert groups["fw"]["best_metric"]["mean"] == pytest.approx((0.82 + 0.86 + 0.87) / 3)
    assert groups["fw"]["train_runtime"]["mean"] == pytest.approx(115.0)

    (test,) = json.loads((results / "significance_tests.json").read_text())["tests"]
    assert (test["a"], test["b"], test["seeds"]) == ("fw", "lora", ["0", "1", "2"])
    # Differences 0.01, 0.03, 0.02: mean 0.02, sd 0.01, t = 0.02 / (0.01 / √3); with 2 degrees of freedom the
    # two-sided p is 1 − t / √(2 + t²).
    t = 0.02 / (0.01 / math.sqrt(3))
    assert test["mean_difference"] == pytest.approx(0.02)
    assert test["t_statistic"] == pytest.approx(t)
    assert test["t_pvalue"] == pytest.approx(1 - t / math.sqrt(2 + t * t))
    assert test["wilcoxon_pvalue"] == pytest.approx(0.25)
    seed0, seed1, _ = test["mcnemar"]
    assert (seed0["a_only_correct"], seed0["b_only_correct"]) == (3, 1)
    assert seed0["pvalue"] == pytest.approx(2 * (1 + 4) / 16)  # 2 · P(X ≤ 1), X ~ Binomial(4, 1/2)
    assert (seed1["a_only_correct"], seed1["b_only_correct"], seed1["pvalue"]) == (0, 0, 1.0)  # same mistakes
    # One comparison: Holm leaves its p-values as they are. The difference's t interval: 0.02 ± t_{0.975,2} 0.01 / √3.
    assert (test["t_pvalue_holm"], test["wilcoxon_pvalue_holm"]) == (test["t_pvalue"], test["wilcoxon_pvalue"])
    assert test["difference"]["ci_low"] == pytest.approx(0.02 - 4.302653 * 0.01 / math.sqrt(3), rel=1e-5)
    # The bootstrap means of three differences lie between their smallest and largest, 0.01 and 0.03.
    assert 0.01 - 1e-12 <= test["bootstrap"]["ci_low"] < 0.02 < test["bootstrap"]["ci_high"] <= 0.03 + 1e-12
    assert test["minimum_detectable_difference"] == pytest.approx(minimum_detectable_difference([0.01, 0.03, 0.02]))
    assert test["verdict"] == "no significant difference"  # t p ≈ 0.074

    # Did capacity move: ρ = 0.8, 0.8, −1 by hand (see KEPT), against both the measured F and the weights 1 − I.
    aggregated = json.loads((results / "aggregated_metrics.json").read_text())
    per_run = {row["run"]: row for row in aggregated["capacity_per_run"]}
    assert set(per_run) == {"fw/seed0", "fw/seed1", "fw/seed2"}  # LoRA's runs are the baseline, not compared
    assert [per_run[f"fw/seed{s}"]["measured_rho"] for s in range(3)] == pytest.approx([0.8, 0.8, -1.0])
    assert [per_run[f"fw/seed{s}"]["applied_rho"] for s in range(3)] == pytest.approx([0.8, 0.8, -1.0])
    assert per_run["fw/seed1"]["baseline"] == "lora/seed1" and per_run["fw/seed1"]["matrices"] == 4
    (cell,) = aggregated["capacity"]
    assert cell["group"] == "fw" and cell["measured_rho"]["mean"] == pytest.approx(0.2)
    assert cell["measured_rho"]["std"] == pytest.approx(math.sqrt((0.6**2 * 2 + 1.2**2) / 2))
    assert (cell["measured_rho"]["ci_low"], cell["measured_rho"]["ci_high"]) == (-1.0, 1.0)  # the t interval, clipped

    table = (results / "results.md").read_text()
    assert "| lora | accuracy | 3 | 0.8200 ± 0.0200 |" in table
    assert "| fw vs lora | accuracy | 3 | +0.0200 |" in table
    assert "| fw | 3 | 0.200 ± 1.039 | [-1.000, +1.000] |" in table

    # Figures: per run (curves, confusion matrix) and per study, PNG and PDF, none empty.
    names = {path.split("/results/")[1] for path in written["figures"]}
    for stem in (
        "figures/dev_metric",
        "figures/train_time",
        "figures/peak_memory",
        "figures/capacity_correlation",
        "figures/importance_heatmap_all",
        "figures/delta_weight_norms_all",
        "runs/fw/seed0/curves",
        "runs/lora/seed2/confusion_matrix",
    ):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    for path in written["figures"]:
        with open(path, "rb") as f:
            assert len(f.read()) > 1000
    assert (results / "runs" / "fw" / "seed0" / METRICS_FILE).is_file()


def test_disturbed_runs_are_left_out_of_the_cost_and_marked(study, tmp_path):
    """Train times 100 + 10 · seed (+5 for fw); fw's seed 2 shared the machine with a test run."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "disturbed_runs.yaml").write_text('fw/seed2: "the test suite, 18:17-18:22"\n')
    aggregate_study(study)
    groups = {g["name"]: g for g in json.loads((results / "aggregated_metrics.json").read_text())["groups"]}
    fw, lora = groups["fw"]["train_time"], groups["lora"]["train_time"]
    assert [(run["seed"], run["seconds"], run["disturbed"]) for run in fw["per_run"]] == [
        ("0", 105.0, False),
        ("1", 115.0, False),
        ("2", 125.0, True),
    ]
    assert fw["undisturbed"] == {"n": 2, "min": 105.0, "median": 110.0, "max": 115.0}
    assert lora["undisturbed"] == {"n": 3, "min": 100.0, "median": 110.0, "max": 120.0}
    table = (results / "results.md").read_text()
    assert "| 105–115 (2 of 3) |" in table and "| 100–120 (3 of 3) |" in table
    assert "1 run(s) marked disturbed in disturbed_runs.yaml" in table
    # The dev metric still counts every run: a machine's load changes a run's time, not what it computes.
    assert groups["fw"]["final"] == FINAL["fw"]


def test_the_train_time_figure_draws_disturbed_runs_apart():
    figure = train_time_figure({"sst2": {"lora": ([100.0, 120.0], []), "fw": ([105.0, 115.0], [125.0])}})
    (ax,) = figure.axes
    crosses = [c for c in ax.collections if c.get_offsets().shape[0] and c.get_paths() and c.get_facecolor().size]
    red = [c for c in crosses if tuple(c.get_facecolor()[0][:3]) == (1.0, 0.0, 0.0)]
    assert len(red) == 1 and red[0].get_offsets().tolist() == [[1.25, 125.0]]
    ranges = [c for c in ax.collections if type(c).__name__ == "LineCollection" and c.get_linewidth()[0] == 6]
    assert [segment.tolist() for c in ranges for segment in c.get_segments()] == [
        [[0.0, 100.0], [0.0, 120.0]],
        [[1.0, 105.0], [1.0, 115.0]],
    ]


@pytest.mark.parametrize(
    "record, message",
    [
        ('fw/seed9: "tests"\n', "names run(s) that"),
        ("fw/seed0: 3\n", "should map each disturbed run's name to what disturbed it"),
        ("- fw/seed0\n", "should map each disturbed run's name to what disturbed it"),
    ],
)
def test_a_wrong_disturbed_runs_record_is_an_error(study, tmp_path, capsys, record, message):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "disturbed_runs.yaml").write_text(record)
    assert main([study.path, "--no_figures"]) == 2
    assert message in capsys.readouterr().err


def test_partial_study_is_marked_and_an_empty_one_is_an_error(study, tmp_path, capsys):
    (tmp_path / "out" / "fw" / "seed2" / RUN_COMPLETE_FILE).unlink()  # killed before it finished
    aggregate_study(study, figures=False)
    assert (tmp_path / "results" / "results.md").read_text().startswith("**Partial: 5 of 6 runs finished.**")
    (test,) = json.loads((tmp_path / "results" / "significance_tests.json").read_text())["tests"]
    assert test["seeds"] == ["0", "1"]  # paired over the seeds both sides finished

    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "none"), "results_dir": "r", "axes": {"seed": [0]}}))
    assert main([str(empty)]) == 2
    assert "No finished run" in capsys.readouterr().err


@pytest.mark.parametrize("method, frozen_at_step", [("iw_lora", 0), ("fw_lora", 4), ("lora", None)])
def test_curves_mark_the_step_each_run_froze_its_importances(method, frozen_at_step, tmp_path):
    """The mark comes from the run's own `fw_importance.json`, not from the study's `fw_warmup_steps`: IW-LoRA freezes
    at step 0 (its calibration runs before the first step), FW-LoRA after its warm-up, LoRA never."""
    run_dir = tmp_path / method
    fabricate_run(run_dir, "lora", 0)
    if frozen_at_step is not None:
        write_importance_file(run_dir, frozen_at_step, [0.25] * len(NAMES))
    extra = {"run": method, "labels": {}, "args": {"method": method, "fw_warmup_steps": 200}}
    metrics = collect_run_metrics(str(run_dir), "sst2", extra)
    assert metrics["frozen_at_step"] == frozen_at_step

    figure = training_curves_figure(metrics, method)
    marks = [
        list(line.get_xdata()) for ax in figure.axes for line in ax.lines if line.get_label() == FROZEN_MARK_LABEL
    ]
    assert marks == ([] if frozen_at_step is None else [[frozen_at_step] * 2] * 2)  # on the loss and the metric panel


def test_holm_family_spans_every_comparison_and_group(tmp_path):
    """Two comparisons on two tasks are one family of four: each p-value is adjusted with the others'."""
    spec = {
        "output_dir": str(tmp_path / "out"),
        "results_dir": str(tmp_path / "results"),
        "axes": {
            "task": {"sst2": {"task_name": "sst2"}, "cola": {"task_name": "cola"}},
            "method": {"lora": {"method": "lora"}, "fw": {"method": "fw_lora"}, "uni": {"method": "fw_lora"}},
            "seed": [0, 1, 2, 3],
        },
        "comparisons": {"axis": "method", "pairs": [["fw", "lora"], ["fw", "uni"]]},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    config = StudyConfig.from_yaml(str(path))
    shift = {("sst2", "fw"): 0.03, ("sst2", "uni"): 0.01, ("cola", "fw"): -0.02, ("cola", "uni"): 0.0}
    noise = [0.004, -0.003, 0.001, 0.006]
    runs = []
    for run in config.runs():
        task, method, seed = run.labels["task"], run.labels["method"], int(run.labels["seed"])
        value = 0.8 + 0.01 * seed + shift.get((task, method), 0.0) + (noise[seed] * (method == "fw"))
        runs.append(
            {
                "labels": run.labels,
                "args": run.args,
                "run": run.name,
                "task_name": task,
                "metric_name": "accuracy",
                "final_metric": value,
                "eval_predictions": [],
            }
        )
    tests = significance_tests(runs, config)
    cells = {(t["group"]["task"], t["a"], t["b"]): t for t in tests}
    assert len(tests) == 4 and set(cells) == {(task, "fw", b) for task in ("sst2", "cola") for b in ("lora", "uni")}
    raw = [stats.ttest_rel(t["a_values"], t["b_values"]).pvalue for t in tests]
    assert [t["t_pvalue"] for t in tests] == pytest.approx(raw)
    # Holm by hand: sort, multiply the k-th smallest by 4 − k, keep the running maximum, cap at 1.
    order = sorted(range(4), key=lambda i: raw[i])
    expected, running = [0.0] * 4, 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (4 - k) * raw[i]))
        expected[i] = running
    assert [t["t_pvalue_holm"] for t in tests] == pytest.approx(expected)
    assert all(t["t_pvalue_holm"] >= t["t_pvalue"] for t in tests)
    assert cells["sst2", "fw", "lora"]["verdict"] == "fw higher (Holm p ≤ 0.05)"
    assert cells["cola", "fw", "lora"]["verdict"] == "fw lower (Holm p ≤ 0.05)"


def test_capacity_comparisons_pair_the_correlations_over_seeds():
    """Fisher's ρ against the uniform control's, seed by seed, per task; a seed one side lacks is left out."""
    rho = {
        ("sst2", "fw"): [0.9, 0.8, 0.85],
        ("sst2", "uni"): [0.7, 0.75, 0.6],
        ("cola", "fw"): [0.5, 0.4, None],
        ("cola", "uni"): [0.45, 0.5, 0.3],
    }
    rows = [
        {"labels": {"task": task, "method": method, "seed": str(seed)}, "seed": str(seed), "measured_rho": value}
        for (task, method), values in rho.items()
        for seed, value in enumerate(values)
    ]
    tests = {t["group"]["task"]: t for t in capacity_comparisons(rows, [("fw", "uni")], "method")}
    assert tests["sst2"]["seeds"] == ["0", "1", "2"] and tests["cola"]["seeds"] == ["0", "1"]
    assert tests["sst2"]["mean_difference"] == pytest.approx((0.2 + 0.05 + 0.25) / 3)
    assert tests["sst2"]["t_pvalue"] == pytest.approx(stats.ttest_rel([0.9, 0.8, 0.85], [0.7, 0.75, 0.6]).pvalue)
    assert tests["cola"]["a_values"] == [0.5, 0.4] and tests["cola"]["mean_difference"] == pytest.approx(-0.025)


def test_a_study_in_parts_gets_combined_files(study, tmp_path, capsys):
    spec = yaml.safe_load(open(study.path))
    second = tmp_path / "second.yaml"
    second.write_text(yaml.safe_dump({**spec, "results_dir": str(tmp_path / "second_part")}))
    combined = tmp_path / "combined"
    assert main([study.path, str(second), "--no_figures", "--combined_dir", str(combined)]) == 0
    for name in ("aggregated_metrics.json", "significance_tests.json"):
        parts = json.loads((combined / name).read_text())["parts"]
        assert parts == {
            "results": json.loads((tmp_path / "results" / name).read_text()),
            "second_part": json.loads((tmp_path / "second_part" / name).read_text()),
        }
    # Two parts whose results_dir end alike would overwrite each other in the combined files: refused.
    clash = tmp_path / "clash.yaml"
    clash.write_text(yaml.safe_dump({**spec, "results_dir": str(tmp_path / "elsewhere" / "results")}))
    assert main([study.path, str(clash), "--no_figures", "--combined_dir", str(combined)]) == 2
    assert "repeat one" in capsys.readouterr().err


def test_saved_figures_do_not_change_when_nothing_in_them_does(tmp_path):
    # Committed results are re-aggregated every session: a figure whose bytes change with the clock (the PDF's
    # CreationDate) shows up as a change in git although its data did not.
    from matplotlib.figure import Figure

    from fw_trainer.study.figures import save_figure

    figure = Figure()
    figure.add_subplot().plot([0, 1], [1, 0])
    first = [open(path, "rb").read() for path in save_figure(figure, str(tmp_path / "one" / "plot"))]
    time.sleep(1.1)  # the PDF's date has a resolution of one second
    second = [open(path, "rb").read() for path in save_figure(figure, str(tmp_path / "two" / "plot"))]
    assert first == second
    assert b"CreationDate" not in first[1]
