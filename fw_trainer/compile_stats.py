"""What `torch.compile` did so far in this process: graphs compiled, graph breaks, recompilations."""


def compile_stats() -> dict[str, int]:
    """
    Counts from TorchDynamo since the process started (or since [`reset_compile_stats`]), for everything compiled in
    the process:

    - `graphs`: FX graphs compiled (a frame split by graph breaks gives several);
    - `graph_breaks`: what dynamo could not trace, each time it met it: graph breaks (a graph split in two, the code
      between run eagerly) and unsupported code that made it skip a frame or an inlined call (also run eagerly);
    - `recompiles`: compilations of a frame that was compiled before, because a guard failed (a new input shape, say).

    A training step that compiles into one graph and then reuses it shows `graphs` fixed, and `graph_breaks` and
    `recompiles` at zero, from the second step on. [`FWLoraTrainer`] logs them as `compile/*` with `--torch_compile`.
    """
    from torch._dynamo.utils import counters, get_compilation_metrics

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values()) + sum(counters["unimplemented"].values())),
        "recompiles": sum(metrics.recompile_reason is not None for metrics in get_compilation_metrics()),
    }


def reset_compile_stats() -> None:
    """Starts [`compile_stats`] from zero again (what was compiled stays compiled: see `torch.compiler.reset()`)."""
    from torch._dynamo.utils import clear_compilation_metrics, counters

    counters.clear()
    clear_compilation_metrics()
