"""
Aggregates a finished (or partly finished) study into the artefacts of a paper, in the study's `results_dir`:

- `runs/<run>/metrics.json` and `eval_predictions_*.tsv`: each run's summary and dev predictions (copied);
- `runs/<run>/confusion_matrix.{png,pdf}` and `curves.{png,pdf}`: per-run figures;
- `aggregated_metrics.json`: per group (every axis but the seed) mean, std and 95 % CI of the final and best dev
  metric, train time and peak memory, and the train time of each run with the range of the undisturbed ones (the runs
  `disturbed_runs.yaml` names are left out of it: `fw_trainer.study.disturbed_runs`); the capacity correlations per
  run and per cell (`fw_trainer.study.capacity`);
- `significance_tests.json`: the study's comparisons (`fw_trainer.study.comparisons`), paired over seeds (t-test and
  Wilcoxon with Holm-adjusted p-values, t and bootstrap intervals of the difference, the smallest detectable
  difference) and per seed (McNemar);
- `results.md`: all three as Markdown tables (with each cell's adapter file size and the hardware, for runs that
  recorded them);
- `figures/`: dev metric bars with 95 % intervals and the seeds, train time (each run, disturbed ones marked, the
  range of the undisturbed ones) and peak memory, the dose-response of a
  study that varies λ, the capacity correlations, importance and `‖ΔW‖_F` heatmaps per method.

    python -m fw_trainer.study.aggregate configs/studies/cpu_minilm.yaml
    python -m fw_trainer.study.aggregate configs/studies/fisher_controls_{a,b}.yaml \
        --combined_dir results/fisher_controls
"""

import argparse
import os
import shutil
import sys
from collections import defaultdict
from typing import Optional

from ..glue.completion import is_finished_run
from ..state_files import write_json_atomic
from .capacity import capacity_comparisons, capacity_correlations, summarize_capacity
from .comparisons import significance_tests
from .config import SEED_AXIS, StudyConfig, StudyConfigError, exit_status
from .disturbed_runs import DISTURBED_RUNS_FILE, format_train_time, read_disturbed_runs, train_time_record
from .report_figures import run_figures, study_figures
from .run_metrics import METRICS_FILE, group_key, group_name, read_run_metrics
from .statistics import summarize


AGGREGATED_METRICS_FILE = "aggregated_metrics.json"
SIGNIFICANCE_TESTS_FILE = "significance_tests.json"


def load_finished_runs(config: StudyConfig) -> list[dict]:
    """
    The `metrics.json` of every finished run of the study ([`is_finished_run`]), in grid order, with `run_dir` added;
    runs still to finish are left out (the report says how many).

    Raises:
        `StudyConfigError`: If a finished run's `metrics.json` is missing or damaged, naming it.
    """
    runs = []
    for run in config.runs():
        run_dir = os.path.join(config.output_dir, run.name)
        if not is_finished_run(run_dir):
            continue
        metrics = read_run_metrics(run_dir)
        if metrics is None and not os.path.exists(os.path.join(run_dir, METRICS_FILE)):
            continue  # finished a moment ago: the sweep writes its metrics.json next
        if metrics is None:
            raise StudyConfigError(
                f"{os.path.join(run_dir, METRICS_FILE)} is damaged although its run finished: rerun the "
                f"sweep (`python -m fw_trainer.study.sweep {config.path}`), which rewrites it from the run's files "
                "without training again."
            )
        runs.append({**metrics, "run_dir": run_dir})
    return runs


def aggregate_groups(runs: list[dict], disturbed: Optional[dict[str, str]] = None) -> list[dict]:
    """
    One entry per group of runs that differ only in their seed; `disturbed` names the runs whose train time other work
    inflated ([`read_disturbed_runs`]).

    Returns:
        `list[dict]`: `group` (axis → label), `name`, `metric_name`, `seeds`, per-seed `final` and `best` values and,
        from [`summarize`], `final_metric`, `best_metric`, `train_runtime` and `train_peak_memory_mb` summaries,
        `train_time` ([`train_time_record`]: each run's, and the range of the undisturbed ones), plus
        `adapter_params`; where its runs recorded them (`run_environment.json`), `adapter_file_bytes` and `hardware`
        (the device names they trained on, sorted). Runs that predate that file give a group without these two keys,
        as before.
    """
    groups = defaultdict(list)
    for metrics in runs:
        groups[group_key(metrics)].append(metrics)
    rows = []
    for key, members in groups.items():
        adapter = members[0].get("adapter") or {}
        row = {
            "group": dict(key),
            "name": group_name(key),
            "task_name": members[0]["task_name"],
            "method": members[0]["args"].get("method"),
            "metric_name": members[0]["metric_name"],
            "seeds": [m["labels"].get(SEED_AXIS) for m in members],
            "final": [m["final_metric"] for m in members],
            "best": [m["best_metric"] for m in members],
            "final_metric": summarize([m["final_metric"] for m in members]),
            "best_metric": summarize([m["best_metric"] for m in members]),
            "train_runtime": summarize([m["train_runtime"] for m in members if m["train_runtime"] is not None]),
            "train_time": train_time_record(members, disturbed or {}),
            "train_peak_memory_mb": summarize(
                [m["train_peak_memory_mb"] for m in members if m["train_peak_memory_mb"] is not None]
            ),
            "adapter_params": adapter.get("adapter_params"),
        }
        # The same for every seed of a cell: the first run that recorded it speaks for it.
        sizes = [m["adapter_file_bytes"] for m in members if m.get("adapter_file_bytes") is not None]
        if sizes:
            row["adapter_file_bytes"] = sizes[0]
        devices = sorted({m["hardware"]["device_name"] for m in members if m.get("hardware")})
        if devices:
            row["hardware"] = devices
        rows.append(row)
    return rows


def _format(summary: dict, digits: int = 4) -> str:
    if summary["mean"] is None:
        return "–"
    if summary["std"] is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def format_p(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.3g}"


def format_interval(low: Optional[float], high: Optional[float], digits: int = 4) -> str:
    return "–" if low is None else f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def comparison_columns(test: dict) -> str:
    """A comparison's statistics as Markdown table cells: n, Δ mean, its t and bootstrap 95 % intervals, the t and
    Wilcoxon p-values raw and Holm-adjusted, the smallest detectable difference and the verdict."""
    difference, bootstrap, mdd = test["difference"], test["bootstrap"], test["minimum_detectable_difference"]
    return " | ".join(
        [
            str(test["n"]),
            "–" if test["mean_difference"] is None else f"{test['mean_difference']:+.4f}",
            format_interval(difference["ci_low"], difference["ci_high"]),
            format_interval(bootstrap["ci_low"], bootstrap["ci_high"]),
            *(format_p(test[key]) for key in ("t_pvalue", "t_pvalue_holm", "wilcoxon_pvalue", "wilcoxon_pvalue_holm")),
            "–" if mdd is None else f"{mdd:.4f}",
            test["verdict"],
        ]
    )


def markdown_tables(
    groups: list[dict],
    tests: list[dict],
    capacity: Optional[list[dict]] = None,
    capacity_tests: Optional[list[dict]] = None,
) -> str:
    """The tables of `results.md`: metrics per group (with the adapter file size and the hardware where the runs
    recorded them: one line above the table when every group trained on the same device, else a column), the
    comparisons, the capacity correlations per cell and the comparisons of those correlations."""
    file_sizes = any("adapter_file_bytes" in row for row in groups)
    # Aggregations written before runs were marked disturbed have no per-run times: their column stays mean ± std.
    time_ranges = all("train_time" in row for row in groups)
    devices = {", ".join(row["hardware"]) for row in groups if "hardware" in row}
    hardware_column = len(devices) > 1 or (bool(devices) and any("hardware" not in row for row in groups))
    lines = [f"Hardware: {devices.pop()}.", ""] if devices and not hardware_column else []
    extra_columns = (" adapter file (MB) |" if file_sizes else "") + (" hardware |" if hardware_column else "")
    lines += [
        "| group | metric | n | final dev (mean ± std) | 95 % CI | best dev (mean ± std) | "
        + ("train time, undisturbed runs (s)" if time_ranges else "train time (s)")
        + " | peak memory (MB) | adapter params |"
        + extra_columns,
        "|---|---|---|---|---|---|---|---|---|" + "---|" * extra_columns.count("|"),
    ]
    for row in groups:
        final = row["final_metric"]
        ci = "–" if final["ci_low"] is None else f"[{final['ci_low']:.4f}, {final['ci_high']:.4f}]"
        params = "–" if row["adapter_params"] is None else f"{row['adapter_params']:,}"
        extra = ""
        if file_sizes:
            size = row.get("adapter_file_bytes")
            extra += " – |" if size is None else f" {size / 2**20:.2f} |"
        if hardware_column:
            extra += f" {', '.join(row.get('hardware', [])) or '–'} |"
        lines.append(
            f"| {row['name']} | {row['metric_name']} | {final['n']} | {_format(final)} | {ci} | "
            f"{_format(row['best_metric'])} | "
            f"{format_train_time(row['train_time']) if time_ranges else _format(row['train_runtime'], 1)} | "
            f"{_format(row['train_peak_memory_mb'], 0)} | {params} |" + extra
        )
    if tests:
        lines += [
            "",
            "Comparisons, paired over seeds (final dev metric; Holm: adjusted over all the rows of this table; MDD: "
            "the smallest true difference the paired t-test detects with 80 % power at α = 0.05).",
            "",
            "| group | a vs b | metric | n | Δ mean (a − b) | t 95 % CI | bootstrap 95 % CI | t p | Holm t p | "
            "Wilcoxon p | Holm Wilcoxon p | MDD | verdict | McNemar p per seed (a only / b only correct) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for test in tests:
            per_seed = "; ".join(
                f"seed {m['seed']}: {format_p(m['pvalue'])} ({m['a_only_correct']}/{m['b_only_correct']})"
                for m in test["mcnemar"]
            )
            lines.append(
                f"| {group_name(tuple(test['group'].items())) or '–'} | {test['a']} vs {test['b']} | "
                f"{test['metric_name']} | {comparison_columns(test)} | {per_seed or '–'} |"
            )
    if capacity:
        lines += [
            "",
            "Did capacity move? Spearman ρ across matrices between the measured Fisher proxy F_m (measured) or the "
            "penalty's protection −w_m (applied) and ‖ΔW_m‖ relative to LoRA's, same seed (mean ± std, 95 % CI).",
            "",
            "| group | n | measured ρ | measured 95 % CI | applied ρ | applied 95 % CI |",
            "|---|---|---|---|---|---|",
        ]
        for row in capacity:
            measured, applied = row["measured_rho"], row["applied_rho"]
            lines.append(
                f"| {row['group']} | {measured['n']} | {_format(measured, 3)} | "
                f"{format_interval(measured['ci_low'], measured['ci_high'], 3)} | {_format(applied, 3)} | "
                f"{format_interval(applied['ci_low'], applied['ci_high'], 3)} |"
            )
    if capacity_tests:
        lines += [
            "",
            "The comparisons on the measured ρ, paired over seeds (exploratory: not among the pre-registered tests).",
            "",
            "| group | a vs b | n | Δ ρ mean (a − b) | t 95 % CI | t p | Wilcoxon p |",
            "|---|---|---|---|---|---|---|",
        ]
        for test in capacity_tests:
            difference = test["difference"]
            lines.append(
                f"| {group_name(tuple(test['group'].items())) or '–'} | {test['a']} vs {test['b']} | {test['n']} | "
                f"{test['mean_difference']:+.3f} | "
                f"{format_interval(difference['ci_low'], difference['ci_high'], 3)} | "
                f"{format_p(test['t_pvalue'])} | {format_p(test['wilcoxon_pvalue'])} |"
            )
    return "\n".join(lines) + "\n"


def write_combined(written: dict[str, dict], combined_dir: str) -> None:
    """
    One `aggregated_metrics.json` and one `significance_tests.json` for a study run as several study files (e.g. its
    parts), each holding every part's document under the part's name. Each part keeps its own Holm family.

    Args:
        written (`dict`): Part name (its `results_dir`'s last component) → what [`aggregate_study`] returned for it.
        combined_dir (`str`): Where the two files go.
    """
    for name in (AGGREGATED_METRICS_FILE, SIGNIFICANCE_TESTS_FILE):
        parts = {part: result["documents"][name] for part, result in written.items()}
        write_json_atomic(os.path.join(combined_dir, name), {"parts": parts})


def aggregate_study(config: StudyConfig, figures: bool = True) -> dict:
    """Writes every artefact listed in the module docstring into `config.results_dir`; returns what it wrote."""
    runs = load_finished_runs(config)
    expected = len(config.runs())
    if not runs:
        raise StudyConfigError(
            f"No finished run of {config.path} in {config.output_dir}: run `python -m fw_trainer.study.sweep "
            f"{config.path}` first."
        )
    results_dir = config.results_dir
    disturbed = read_disturbed_runs(config)
    groups = aggregate_groups(runs, disturbed)
    tests = significance_tests(runs, config) if config.comparison_pairs else []
    correlations = capacity_correlations(runs, config.comparison_axis)
    capacity = summarize_capacity(correlations)
    capacity_tests = capacity_comparisons(correlations, config.comparison_pairs, config.comparison_axis)
    header = {"study": config.path, "finished_runs": len(runs), "expected_runs": expected}
    documents = {
        AGGREGATED_METRICS_FILE: {
            **header,
            "groups": groups,
            "capacity": capacity,
            "capacity_comparisons": capacity_tests,
            "capacity_per_run": correlations,
        },
        SIGNIFICANCE_TESTS_FILE: {**header, "tests": tests},
    }
    for name, document in documents.items():
        write_json_atomic(os.path.join(results_dir, name), document)
    with open(os.path.join(results_dir, "results.md"), "w", encoding="utf-8") as f:
        if len(runs) < expected:
            f.write(f"**Partial: {len(runs)} of {expected} runs finished.**\n\n")
        resumed = sum(1 for metrics in runs if (metrics.get("train_segments") or 1) > 1)
        f.write(
            "Train time: each run's training wall time summed over its segments, as the range of the runs nothing "
            "else shared the machine with ("
            + (
                f"{len(disturbed)} run(s) marked disturbed in {DISTURBED_RUNS_FILE}"
                if disturbed
                else "none marked disturbed"
            )
            + "); "
            + (
                f"{resumed} run(s) were interrupted and resumed (the time lost after their last checkpoint is not "
                "counted).\n\n"
                if resumed
                else "no run was resumed.\n\n"
            )
        )
        f.write(markdown_tables(groups, tests, capacity, capacity_tests))

    written = {"groups": groups, "tests": tests, "capacity": capacity, "documents": documents, "figures": []}
    for metrics in runs:
        out_dir = os.path.join(results_dir, "runs", metrics["run"])
        os.makedirs(out_dir, exist_ok=True)
        for name in [METRICS_FILE, *metrics["eval_predictions"]]:
            shutil.copyfile(os.path.join(metrics["run_dir"], name), os.path.join(out_dir, name))
        if figures:
            written["figures"] += run_figures(metrics, out_dir)
    if figures:
        figures_dir = os.path.join(results_dir, "figures")
        written["figures"] += study_figures(runs, groups, correlations, capacity, config, figures_dir)
    print(f"Aggregated {len(runs)} of {expected} runs into {results_dir}:\n")
    print(markdown_tables(groups, tests, capacity, capacity_tests))
    return written


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fw_trainer.study.aggregate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study", nargs="+", help="The study YAML file(s) that the sweep ran.")
    parser.add_argument("--no_figures", action="store_true", help="Write the tables and statistics only.")
    parser.add_argument(
        "--combined_dir",
        default=None,
        help="Also write one aggregated_metrics.json and significance_tests.json here, holding each study file's "
        "under the name of its results_dir (for a study run in parts, e.g. results/fisher_controls).",
    )
    args = parser.parse_args(argv)

    def aggregate() -> None:
        configs = [StudyConfig.from_yaml(path) for path in args.study]
        names = [os.path.basename(os.path.normpath(config.results_dir)) for config in configs]
        if args.combined_dir and len(set(names)) < len(names):
            raise StudyConfigError(
                f"--combined_dir names each part by its results_dir's last component, but {names} repeat one: give "
                "the study files results_dir values that end differently."
            )
        written = {name: aggregate_study(config, figures=not args.no_figures) for name, config in zip(names, configs)}
        if args.combined_dir:
            write_combined(written, args.combined_dir)

    return exit_status(aggregate)


if __name__ == "__main__":
    sys.exit(main())
