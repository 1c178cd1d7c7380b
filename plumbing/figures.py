"""The figures the stages draw: select_token.py's learned matchings (Figures 3 and 8) and matching
dynamics (Figures 7 and 10), gfpo.py's tag choice over steps. Matplotlib with the Agg backend (no
display needed); each function writes one PNG.
"""
import numpy as np

# One colour per meaning in every figure of the project; toy_compare.py's variants and styles take
# other colours (a test keeps the tables apart). Epochs are shaded in order with viridis, GFPO's
# tags with cividis.
COLOURS = {"eq6_token": "tab:cyan",  # the edges of the Eq. 6 token
           "other_tokens": "silver",  # the edges of every other token
           "curve": "black"}  # a panel's one measured quantity


def draw(edges, tokens, chosen, path, keys):
    """Figures 3 and 8: forking tokens left, traces or sources right, edge width = weight. The legend's
    widths are those of the heaviest and the lightest edge drawn. keys: the right-hand nodes, top to
    bottom."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    y_tok = {f: 1 - f / max(len(tokens) - 1, 1) for f in range(len(tokens))}
    y_key = {k: 1 - i / max(len(keys) - 1, 1) for i, k in enumerate(keys)}
    top = max(edges.values(), default=1)
    width = lambda w: 0.5 + 6 * w / top  # noqa: E731
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.45 * max(len(tokens), len(keys))))
    for (f, k), w in sorted(edges.items(), key=lambda e: e[0][0] == chosen):  # the chosen token's on top
        ax.plot([0, 1], [y_tok[f], y_key[k]], color=COLOURS["eq6_token" if f == chosen else "other_tokens"],
                linewidth=width(w), alpha=0.8, solid_capstyle="butt")
    for f, name in enumerate(tokens):
        ax.text(-0.03, y_tok[f], name, ha="right", va="center", fontweight="bold" if f == chosen else None)
    for k in keys:
        ax.text(1.03, y_key[k], str(k), ha="left", va="center")
    counts = sorted(set(edges.values()), reverse=True)
    handles = [Line2D([], [], color=COLOURS["other_tokens"], linewidth=width(w), label=f"{w} times")
               for w in counts[:1] + counts[-1:] * (len(counts) > 1)]  # the heaviest and the lightest edge
    handles.append(Line2D([], [], color=COLOURS["eq6_token"], linewidth=3, label=f"edges of {tokens[chosen]} (Eq. 6)"))
    ax.legend(handles=handles, title="edge width = times matched in the kept configurations", loc="upper center",
              bbox_to_anchor=(0.5, 0), ncol=3, fontsize=8, title_fontsize=8)
    ax.set_xlim(-0.4, 1.4)
    ax.axis("off")
    ax.set_title(f"learned matchings (chosen for Pass@1: {tokens[chosen]})")
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def draw_dynamics(epochs, steps, path):
    """Figures 7 and 10 of a run, epochs counted from 1: per epoch the counts of the optimal
    configurations, most frequent first (a few accumulating the mass = learned matchings; a flat spread
    = none), and the number of distinct ones with the top one's share; per step the matching gap and
    the loss. Earlier epochs are drawn wider beneath later ones, so that equal curves all show."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (counts_ax, distinct_ax), (gap_ax, loss_ax) = axes
    shades = plt.get_cmap("viridis")
    number = range(1, len(epochs) + 1)
    for n, e in zip(number, epochs):
        counts = sorted((c["count"] for c in e["configurations"]), reverse=True)
        later = (len(epochs) - n) / max(len(epochs) - 1, 1)  # 1 for the first epoch, 0 for the last
        counts_ax.plot(range(1, len(counts) + 1), counts, marker="o", markersize=3 + 6 * later,
                       linewidth=1 + 4 * later, color=shades(0.9 * (n - 1) / max(len(epochs) - 1, 1)),
                       label=f"epoch {n}")
    counts_ax.set(xscale="log", yscale="log", xlabel="configuration, by rank (most frequent first)",
                  ylabel="times optimal in the epoch", title="Figure 7: counts of the optimal configurations")
    counts_ax.legend(fontsize=8)
    distinct = [len(e["configurations"]) for e in epochs]
    top = [max((c["count"] for c in e["configurations"]), default=0) /
           max(sum(c["count"] for c in e["configurations"]), 1) for e in epochs]
    distinct_ax.plot(number, distinct, marker="o", color=COLOURS["curve"])
    for n, d, t in zip(number, distinct, top):
        distinct_ax.annotate(f"top {100 * t:.0f}%", (n, d), textcoords="offset points", xytext=(0, 6),
                             ha="center", fontsize=8)
    distinct_ax.set(xlabel="epoch", ylabel="distinct optimal configurations", ylim=(0, max(distinct, default=1) * 1.2),
                    xlim=(0.5, len(epochs) + 0.5),
                    title="Figure 7: distinct optimal configurations per epoch")
    distinct_ax.text(0.02, 0.03, "label: share of the epoch's matchings taken by the most frequent configuration",
                     transform=distinct_ax.transAxes, fontsize=8)
    step = [r["step"] + 1 for r in steps]  # counted from 1, as train.py prints them
    gap_ax.plot(step, [r["gap"] if r.get("gap") is not None else float("nan") for r in steps], color=COLOURS["curve"])
    gap_ax.set(xlabel="step", ylabel="mean cost of the other matchings - optimal", title="Figure 10: matching gap")
    loss_ax.plot(step, [r["loss"] if r.get("loss") is not None else float("nan") for r in steps], color=COLOURS["curve"])
    loss_ax.set(xlabel="step", ylabel="loss (Eq. 5)", yscale="log", title="training loss")
    for ax in (distinct_ax, gap_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10], min_n_ticks=1))  # epochs, steps: whole numbers
    distinct_ax.yaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10], min_n_ticks=1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_tag_choice(records, names, path):
    """tag_choice.png: pi averaged over each step's questions, stacked per tag, and the mean reward."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    steps = [r["step"] + 1 for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    shades = plt.get_cmap("cividis")(np.linspace(0.15, 0.95, len(names)))  # tags: cividis, a meaning no other figure colours
    ax.stackplot(steps, np.array([r["tag_choice"] for r in records]).T, labels=names, colors=shades, alpha=0.9)
    ax.plot(steps, [r["reward"] for r in records], color="black", marker=".", label="mean reward")
    ax.set(xlabel="step", ylabel="mean pi(tag | x) over the step's questions", ylim=(0, 1),
           title="GFPO: the tag-choice distribution")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
