"""Pictures of a finished run (optional matplotlib), drawn from a method's state after training:
train.py calls plot(method, out_dir). Nothing here is needed to train; a method file never imports it.

    g2r2_modules.png      G²R²: the step at which each module was pruned (layers × module types)
    pilora_partition.png  PiLoRA: dominant / supplementary rows per matrix (Fig. 3 style), hit histogram
    taso_importance.png   TASO: the first target's importance map with its core rows and columns
    spsft_rows.png        SPSFT: the selected rows of every adapted matrix
"""
import os

import torch


def pyplot():
    """matplotlib.pyplot on the file backend, or None when matplotlib (optional) is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, out_dir, name, dpi=120):
    """Write fig to out_dir/name (tight layout), close it, return the path."""
    import matplotlib.pyplot as plt
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def plot(method, out_dir):
    """The method's picture in out_dir (its path), or None (no picture for it, or no matplotlib)."""
    draw = {"G2R2": g2r2, "PiLoRA": pilora, "TASO": taso, "SPSFT": spsft}.get(type(method).__name__)
    return draw(method, out_dir) if draw else None


def g2r2(m, out_dir):
    """Layers × module-type grid: the step at which each module was pruned (retained: blank)."""
    plt = pyplot()
    if plt is None:
        return None
    layer_of = lambda n: next((int(p) for p in n.split(".") if p.isdigit()), 0)
    types = list(dict.fromkeys(n.split(".")[-1] for n in m.names))
    layers = sorted({layer_of(n) for n in m.names})
    grid = torch.full((len(layers), len(types)), float("nan"))
    for i, n in enumerate(m.names):
        grid[layers.index(layer_of(n)), types.index(n.split(".")[-1])] = m.pruned_at.get(i, float("nan"))
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(types), 1 + 0.25 * len(layers)))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_ylabel("layer")
    ax.set_title(f"G²R²: pruned at step (blank = retained, {len(m.retained())}/{len(m.names)})")
    fig.colorbar(im, ax=ax, label="step")
    return save_figure(fig, out_dir, "g2r2_modules.png")


def pilora(m, out_dir):
    """Fig. 3 style: each matrix's dominant (1) / supplementary (0) rows as a stripe; hit histogram."""
    plt = pyplot()
    if plt is None:
        return None
    if m.dominant is None:
        return None
    width = max(m for m, _ in m.shapes.values())
    img = torch.full((len(m.names), width), float("nan"))
    for i, n in enumerate(m.names):
        img[i, :m.shapes[n][0]] = 0.0
        img[i, m.dominant[n]] = 1.0
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 2 + 0.25 * len(m.names)),
                                   gridspec_kw={"width_ratios": [3, 1]})
    ax1.imshow(img.numpy(), aspect="auto", interpolation="nearest", cmap="coolwarm")
    ax1.set_yticks(range(len(m.names)), m.names, fontsize=6)
    ax1.set_xlabel("output neuron (red: dominant, blue: supplementary)")
    hits = torch.cat([h.cpu() for h in m.hits.values()])  # scored on the model's device
    ax2.hist(hits.numpy(), bins=[b - 0.5 for b in range(int(hits.max()) + 2)])
    ax2.set_xlabel(f"hit count H ({m.scorings} scorings)")
    return save_figure(fig, out_dir, "pilora_partition.png")


def taso(m, out_dir):
    """The importance map of the first target with its core rows (red) and columns (cyan)."""
    if m.example is None:
        return None  # resumed runs keep no importance map
    plt = pyplot()
    if plt is None:
        return None
    name, I = m.example
    R, C = m.rows[name], m.cols[name]
    fig, ax = plt.subplots(figsize=(7, 7 * I.shape[0] / I.shape[1] + 0.5))
    floor = I[I > 0].min() if (I > 0).any() else torch.tensor(1.0)
    ax.imshow(torch.log10(I.clamp_min(floor)).numpy(), cmap="gray", aspect="auto", interpolation="nearest")
    for i in R.tolist():
        ax.axhspan(i - 0.5, i + 0.5, fill=False, edgecolor="red", linewidth=0.6)
    for j in C.tolist():
        ax.axvspan(j - 0.5, j + 0.5, fill=False, edgecolor="cyan", linewidth=0.6)
    ax.set_title(f"TASO importance log10 |{m.metric}| of {name}: {len(R)} core rows, {len(C)} columns")
    ax.set_xlabel("input column")
    ax.set_ylabel("output row")
    return save_figure(fig, out_dir, "taso_importance.png")


def spsft(m, out_dir):
    """Selected rows per adapted matrix (x: output neuron / d_out, y: matrix), spsft_rows.png."""
    plt = pyplot()
    if plt is None:
        return None
    names = list(m.idx)
    fig, ax = plt.subplots(figsize=(8, 0.18 * len(names) + 1.5))
    for y, n in enumerate(names):
        pos = m.idx[n].float() / m.shapes[n][0]
        ax.scatter(pos, torch.full_like(pos, y), s=2, marker="|")
    ax.set_yticks(range(len(names)), [n.split("layers.")[-1] for n in names], fontsize=5)
    ax.set_xlabel("selected output neuron i / d_out")
    ax.set_title(f"SPSFT rows ({m.importance})")
    return save_figure(fig, out_dir, "spsft_rows.png", dpi=150)
