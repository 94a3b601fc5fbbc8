"""
The layer × role heatmap of per-matrix values (importances, `‖ΔW‖_F`): drawn into TensorBoard by the trainer when the
importances freeze, and into the study's figures. matplotlib's object API, no pyplot state, no display needed.
"""

import numpy as np
from matplotlib.figure import Figure

from .architectures import TARGET_ROLES, layer_index, module_role


_ROLE_LABELS = {
    "query": "query",
    "key": "key",
    "value": "value",
    "qkv": "qkv",
    "attention_output": "attn out",
    "ffn_gate": "ffn gate",
    "ffn_in": "ffn in",
    "ffn_gate_up": "ffn gate+up",
    "ffn_out": "ffn out",
}


def layer_role_grid(values: dict[str, float]) -> tuple[np.ndarray, list[int], list[str]]:
    """
    Arranges per-matrix values as a layer × role grid.

    Args:
        values (`dict[str, float]`): Module name (`roberta.encoder.layer.3.attention.self.query`,
            `model.layers.3.mlp.up_proj`) → value. Names outside the numbered transformer layers are left out.

    Returns:
        `(grid, layers, roles)`: `grid[i, j]` is the value of role `roles[j]` in layer `layers[i]` (NaN where that
        matrix is not adapted). Roles are the architecture tables' (in the order of `TARGET_ROLES`: `query`, `key`,
        `value`, `qkv`, `attention_output`, `ffn_gate`, `ffn_in`, `ffn_gate_up`, `ffn_out`) for every known
        architecture, else module-name suffixes in module order.
    """
    cells = {}
    for name, value in values.items():
        layer, role = layer_index(name), module_role(name)
        if layer is not None and role is not None:
            cells[layer, role] = value
    layers = sorted({layer for layer, _ in cells})
    seen = list(dict.fromkeys(role for _, role in cells))  # first-seen order is module (forward) order
    roles = [role for role in TARGET_ROLES if role in seen] + [role for role in seen if role not in TARGET_ROLES]
    grid = np.full((len(layers), len(roles)), np.nan)
    for (layer, role), value in cells.items():
        grid[layers.index(layer), roles.index(role)] = value
    return grid, layers, roles


def _draw_grid(axes, grid: np.ndarray, layers: list[int], roles: list[str], title: str, vmin=None, vmax=None):
    image = axes.imshow(grid, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
    axes.set_xticks(range(len(roles)), [_ROLE_LABELS.get(role, role) for role in roles], rotation=45, ha="right")
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set_ylabel("layer")
    axes.set_title(title, fontsize=10)
    return image


def heatmap_figure(panels: dict[str, dict[str, float]], value_label: str, shared_scale: bool = True) -> Figure:
    """
    One layer × role heatmap per panel, side by side.

    Args:
        panels (`dict[str, dict[str, float]]`): Panel title → (module name → value), e.g. `{"FW-LoRA": importances}`.
        value_label (`str`): The colour bar's label.
        shared_scale (`bool`): One colour scale for all panels (to compare magnitudes), else one each.
    """
    grids = {title: layer_role_grid(values) for title, values in panels.items()}
    finite = [grid[np.isfinite(grid)] for grid, _, _ in grids.values()]
    vmin = min((v.min() for v in finite if v.size), default=0.0) if shared_scale else None
    vmax = max((v.max() for v in finite if v.size), default=1.0) if shared_scale else None
    figure = Figure(figsize=(1.0 + 3.2 * len(panels), 3.6), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, (grid, layers, roles)) in zip(axes, grids.items()):
        image = _draw_grid(ax, grid, layers, roles, title, vmin, vmax)
        if not shared_scale:
            figure.colorbar(image, ax=ax, label=value_label)
    if shared_scale:
        figure.colorbar(image, ax=list(axes), label=value_label)
    return figure


def add_importance_heatmap(writers: list, importances: dict[str, float], frozen_at_step: int, step: int) -> None:
    """The frozen importances as a heatmap image in each TensorBoard `SummaryWriter` (`fw_importance/heatmap`)."""
    figure = heatmap_figure({f"importances frozen at step {frozen_at_step}": importances}, "importance I")
    for writer in writers:
        writer.add_figure("fw_importance/heatmap", figure, step, close=False)
        writer.flush()
