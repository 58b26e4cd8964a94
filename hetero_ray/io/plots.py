"""PNG plots for the report beside a fused adapter: loss curves, alpha per group, and which source fed which
target layer (attention mass). matplotlib with the non-interactive Agg backend."""

from __future__ import annotations

from pathlib import Path

PLOTS = ("loss.png", "alpha.png", "attention_mass.png")


def write_plots(report: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = report.get("history") or []
    steps = [h["step"] for h in history]
    written = []

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(steps, [h["lm_loss"] for h in history], marker=".")
    ax1.set(title="LM loss (replay, answer tokens)", xlabel="optimizer step")
    ax2.plot(steps, [h["rdm"] for h in history], marker=".", color="tab:orange")
    ax2.set(title="RDM", xlabel="optimizer step")
    written.append(_save(fig, out_dir / PLOTS[0]))

    fig, ax = plt.subplots(figsize=(6, 3.2))
    groups = sorted({g for h in history for g in h.get("alpha", {})})
    for g in groups:
        ax.plot(steps, [h["alpha"].get(g) for h in history], label=g)
    ax.set(title="alpha per group", xlabel="optimizer step")
    if groups:
        ax.legend(fontsize=7, ncol=2)
    written.append(_save(fig, out_dir / PLOTS[1]))

    mass = report.get("attention_mass") or {}
    sources = [s["source_id"] for s in report.get("alignment", {}).get("sources", [])]
    layers = sorted({int(layer) for per_layer in mass.values() for layer in per_layer})
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * len(layers) + 2), max(2, 0.5 * len(sources) + 1.2)))
    if layers and sources:
        grid = [[0.0] * len(layers) for _ in sources]
        for per_layer in mass.values():
            for layer, values in per_layer.items():
                for s, v in enumerate(values):
                    grid[s][layers.index(int(layer))] += v / len(mass)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(layers)), [str(x) for x in layers])
        ax.set_yticks(range(len(sources)), sources)
        fig.colorbar(im, ax=ax)
    ax.set(title="attention mass per source", xlabel="target layer")
    written.append(_save(fig, out_dir / PLOTS[2]))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
