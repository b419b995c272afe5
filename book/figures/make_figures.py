"""Draw the book's two method diagrams as static PNGs (boxes and arrows, no data, no model).

* ``book/images/pipeline.png`` -- the whole method: image -> U-Net -> embeddings and three
  classes -> mean-shift clustering -> instances; Monte-Carlo dropout draws -> agglomeration ->
  per-instance probabilities and uncertainty -> PAvPU and proofreading (used in the intro).
* ``book/images/unet.png`` -- the U-Net: five levels, 19 filters doubling per level, the two
  1x1 heads (16-d embedding, 3 class logits) (used in the chapter on the discriminative loss).

Both depend only on the architecture and the method, never on a trained model, so they are
committed; rerun after changing them::

    python book/figures/make_figures.py          # writes both PNGs next to the chapters
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

IMAGES = Path(__file__).resolve().parent.parent / "images"

# one colour per kind of step
NETWORK = "#cfe2f3"  # the U-Net and its outputs
POSTPROC = "#d9ead3"  # deterministic post-processing
SAMPLING = "#fce5cd"  # Monte-Carlo dropout and agglomeration
EVALUATE = "#e6d7f0"  # uncertainty, evaluation, proofreading
DATA = "#eeeeee"  # input and output data
EDGE = "#444444"


def box(
    ax,
    x,
    y,
    w,
    h,
    text,
    color,
    *,
    size=10,
    weight="normal",
    chapter=None,
    chapter_size=8,
):
    """A rounded box centred at (x, y); ``chapter`` is written small in its lower right corner."""
    ax.add_patch(
        FancyBboxPatch(
            (x - w / 2, y - h / 2),
            w,
            h,
            boxstyle="round,pad=0.02,rounding_size=0.08",
            facecolor=color,
            edgecolor=EDGE,
            linewidth=1.2,
        )
    )
    ax.text(
        x,
        y,
        text,
        ha="center",
        va="center",
        fontsize=size,
        weight=weight,
        linespacing=1.25,
    )
    if (
        chapter
    ):  # small, in the box's lower right corner (under it, arrows would cross it)
        ax.text(
            x + w / 2 - 0.08,
            y - h / 2 + 0.07,
            chapter,
            ha="right",
            va="bottom",
            fontsize=chapter_size,
            color="#555555",
            style="italic",
        )


def arrow(
    ax,
    start,
    end,
    *,
    text=None,
    color=EDGE,
    style="-|>",
    rad=0.0,
    lw=1.4,
    text_offset=(0.0, 0.1),
    size=8.5,
    ls="-",
):
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle=style,
            mutation_scale=14,
            color=color,
            linewidth=lw,
            linestyle=ls,
            connectionstyle=f"arc3,rad={rad}",
            shrinkA=0,
            shrinkB=0,
        )
    )
    if text:
        xm = (start[0] + end[0]) / 2 + text_offset[0]
        ym = (start[1] + end[1]) / 2 + text_offset[1]
        ax.text(xm, ym, text, ha="center", va="bottom", fontsize=size, color="#333333")


def pipeline(path: Path) -> None:
    """Portrait, two columns (one pass | Monte-Carlo passes), read at the page's width: its
    text keeps about 14 px on an 800 px wide column."""
    fig, ax = plt.subplots(figsize=(10, 12.6))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 12.6)
    ax.axis("off")
    left, right, w, text = 2.45, 7.55, 4.5, 13.5
    big = dict(size=text, chapter_size=11.5)
    for x, title, color in (
        (left, "one deterministic pass:\na segmentation", "#1f4e79"),
        (
            right,
            "S Monte-Carlo dropout passes: a segmentation\nthat knows where it may be wrong",
            "#7f4f00",
        ),
    ):
        ax.text(
            x,
            12.2,
            title,
            fontsize=14.5,
            weight="bold",
            ha="center",
            va="center",
            color=color,
        )
    rows = [11.0, 9.45, 7.75, 5.95, 4.2, 2.5, 0.85]
    h3, h4 = 1.15, 1.45

    # --- left: image -> U-Net -> two heads -> mean shift -> instances -> AP
    box(
        ax,
        left,
        rows[0],
        w,
        h3,
        "image, 2 x H x W\n(fluorescence, brightfield)",
        DATA,
        chapter="chapter 01",
        **big,
    )
    box(
        ax,
        left,
        rows[1],
        w,
        h3,
        "U-Net\n(dropout off)",
        NETWORK,
        weight="bold",
        chapter="chapters 02-04",
        **big,
    )
    box(ax, left - 1.17, rows[2], 2.15, h3, "embedding\n16 x H x W", NETWORK, size=12.5)
    box(
        ax,
        left + 1.17,
        rows[2],
        2.15,
        h3,
        "3 class logits:\nbackground,\nworm, overlap",
        NETWORK,
        size=12.5,
    )
    box(
        ax,
        left,
        rows[3],
        w,
        h4,
        "mean-shift clustering of\nthe foreground embeddings\n+ overlap heuristic",
        POSTPROC,
        chapter="chapter 05",
        **big,
    )
    box(
        ax,
        left,
        rows[4],
        w,
        h3,
        "instances: K binary masks,\nK x H x W (may overlap)",
        DATA,
        **big,
    )
    box(
        ax,
        left,
        rows[5],
        w,
        h3,
        "average precision against\nthe true worms (avAP, AP50, AP75)",
        EVALUATE,
        chapter="chapter 08",
        **big,
    )
    down = dict(lw=1.6)
    arrow(ax, (left, rows[0] - h3 / 2), (left, rows[1] + h3 / 2), **down)
    arrow(ax, (left - 0.6, rows[1] - h3 / 2), (left - 1.17, rows[2] + h3 / 2), **down)
    arrow(ax, (left + 0.6, rows[1] - h3 / 2), (left + 1.17, rows[2] + h3 / 2), **down)
    arrow(
        ax,
        (left - 1.17, rows[2] - h3 / 2),
        (left - 0.6, rows[3] + h4 / 2),
        text="points",
        text_offset=(-0.55, -0.1),
        size=11.5,
        **down,
    )
    arrow(
        ax,
        (left + 1.17, rows[2] - h3 / 2),
        (left + 0.6, rows[3] + h4 / 2),
        text="which pixels",
        text_offset=(0.85, -0.1),
        size=11.5,
        **down,
    )
    arrow(
        ax,
        (left, rows[3] - h4 / 2),
        (left, rows[4] + h3 / 2),
        text="one mask per centre",
        text_offset=(1.25, -0.12),
        size=11.5,
        **down,
    )
    arrow(ax, (left, rows[4] - h3 / 2), (left, rows[5] + h3 / 2), **down)

    # --- right: the same image -> S passes -> S segmentations -> agglomeration -> P_k -> H -> uses
    box(ax, right, rows[0], w, h3, "the same image", DATA, **big)
    box(
        ax,
        right,
        rows[1],
        w,
        h3,
        "the same U-Net, S times, dropout on\n(a new mask per pass)",
        SAMPLING,
        chapter="chapters 03, 06",
        **big,
    )
    box(
        ax,
        right,
        rows[2],
        w,
        h3,
        "S segmentations\n(mean shift on each, as on the left)",
        SAMPLING,
        chapter="chapter 06",
        **big,
    )
    box(
        ax,
        right,
        rows[3],
        w,
        h4,
        "agglomeration: match the passes'\ninstances (IoU, Hungarian)\nand average them",
        SAMPLING,
        chapter="chapter 07",
        **big,
    )
    box(
        ax,
        right,
        rows[4],
        w,
        h3,
        "per-instance probability maps $P_k$\n(binarised at 0.75)",
        DATA,
        **big,
    )
    box(
        ax,
        right,
        rows[5],
        w,
        h3,
        "uncertainty: the entropy $H(P_k)$\nper pixel and patch",
        EVALUATE,
        **big,
    )
    box(
        ax,
        right - 1.17,
        rows[6],
        2.15,
        h4,
        "PAvPU: is it\nuncertain where\nit is wrong?",
        EVALUATE,
        chapter="chapter 09",
        size=12.5,
        chapter_size=11.5,
    )
    box(
        ax,
        right + 1.17,
        rows[6],
        2.15,
        h4,
        "proofreading:\nshow a human the\nuncertain places",
        EVALUATE,
        chapter="chapter 10",
        size=12.5,
        chapter_size=11.5,
    )
    arrow(ax, (right, rows[0] - h3 / 2), (right, rows[1] + h3 / 2), **down)
    arrow(
        ax,
        (right, rows[1] - h3 / 2),
        (right, rows[2] + h3 / 2),
        text="S passes",
        text_offset=(0.65, -0.12),
        size=11.5,
        **down,
    )
    for upper, lower, hu in ((2, 3, h3), (3, 4, h4), (4, 5, h3)):
        arrow(
            ax,
            (right, rows[upper] - hu / 2),
            (right, rows[lower] + (h4 if lower == 3 else h3) / 2),
            **down,
        )
    arrow(ax, (right - 0.6, rows[5] - h3 / 2), (right - 1.17, rows[6] + h4 / 2), **down)
    arrow(ax, (right + 0.6, rows[5] - h3 / 2), (right + 1.17, rows[6] + h4 / 2), **down)
    # the binarised maps are an instance segmentation too: evaluated like the left column's
    arrow(
        ax,
        (right - w / 2, rows[4] - 0.2),
        (left + w / 2, rows[5] + 0.2),
        ls="--",
        color="#777777",
        text="binarised",
        text_offset=(0.0, 0.02),
        size=11.5,
        lw=1.5,
    )

    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def unet(path: Path) -> None:
    depth, base = 5, 19
    widths = [base * 2**i for i in range(depth)]
    fig, ax = plt.subplots(figsize=(14.5, 8.6))
    ax.set_xlim(-0.3, 15.2)
    ax.set_ylim(-1.5, 7.5)
    ax.axis("off")

    level_y = [6.1 - 1.45 * i for i in range(depth)]
    centre, step = 6.7, 1.05  # the bottleneck's x; the U narrows by ``step`` per level
    enc_x = [
        centre - step * (depth - 1 - i) - 0.8 * (i < depth - 1) for i in range(depth)
    ]
    dec_x = [2 * centre - x for x in enc_x]  # mirrored; the bottom level is shared
    resolution = ["H x W", "H/2 x W/2", "H/4 x W/4", "H/8 x W/8", "H/16 x W/16"]
    bw, bh = 1.75, 0.84

    ax.text(
        -0.2,
        7.2,
        "input: 2 x H x W (fluorescence, brightfield)",
        fontsize=14.5,
        va="center",
    )
    arrow(ax, (0.35, 7.0), (enc_x[0] - bw / 2, level_y[0] + 0.2), rad=0.25)
    for i in range(depth):
        y = level_y[i]
        ax.text(
            -0.2,
            y,
            f"level {i + 1}\n{resolution[i]}",
            fontsize=13,
            va="center",
            color="#333333",
        )
        box(
            ax,
            enc_x[i],
            y,
            bw,
            bh,
            f"2 x conv 3x3\n+ ReLU, {widths[i]} ch",
            NETWORK,
            size=12.8,
        )
        if i < depth - 1:
            arrow(
                ax,
                (enc_x[i], y - bh / 2),
                (enc_x[i + 1] - 0.2, level_y[i + 1] + bh / 2),
                color="#c0392b",
                text="max-pool 2x2",
                text_offset=(-0.85, -0.05),
                size=11.6,
            )
            box(
                ax,
                dec_x[i],
                y,
                bw,
                bh,
                f"2 x conv 3x3\n+ ReLU, {widths[i]} ch",
                NETWORK,
                size=12.8,
            )
            arrow(
                ax,
                (dec_x[i + 1] + 0.2, level_y[i + 1] + bh / 2),
                (dec_x[i], y - bh / 2),
                color="#2e86c1",
                text=f"up-conv 2x2\n-> {widths[i]} ch",
                text_offset=(0.9, -0.25),
                size=11.6,
            )
            arrow(
                ax,
                (enc_x[i] + bw / 2, y),
                (dec_x[i] - bw / 2, y),
                color="#7f8c8d",
                ls="--",
                text=f"skip: {widths[i]} + {widths[i]} ch",
                size=11.6,
            )
    ax.text(
        enc_x[-1],
        level_y[-1] - 0.5,
        "bottleneck",
        ha="center",
        va="top",
        fontsize=12.3,
        style="italic",
        color="#555555",
    )

    # the two heads on the last decoder level
    hx = 14.05
    box(
        ax,
        hx,
        level_y[0] + 0.55,
        1.9,
        0.95,
        "1x1 conv\nembedding\n16 x H x W",
        POSTPROC,
        size=12.8,
    )
    box(
        ax,
        hx,
        level_y[0] - 0.95,
        1.9,
        0.95,
        "1x1 conv\n3 class logits\n3 x H x W",
        POSTPROC,
        size=12.8,
    )
    arrow(ax, (dec_x[0] + bw / 2, level_y[0] + 0.1), (hx - 0.95, level_y[0] + 0.55))
    arrow(ax, (dec_x[0] + bw / 2, level_y[0] - 0.1), (hx - 0.95, level_y[0] - 0.95))
    ax.text(
        hx,
        level_y[0] + 0.0,
        "trained with the\ndiscriminative loss",
        ha="center",
        va="top",
        fontsize=12.3,
        color="#333333",
    )
    ax.text(
        hx,
        level_y[0] - 1.5,
        "background / worm /\noverlap; cross-entropy",
        ha="center",
        va="top",
        fontsize=12.3,
        color="#333333",
    )

    ax.text(
        7.3,
        -0.9,
        "Probabilistic model: every convolution (3x3, up-conv 2x2 and both 1x1 heads) reads "
        "its input through its own\nConcrete Dropout layer with a learned rate -- "
        f"{2 * depth + 2 * (depth - 1) + (depth - 1) + 2} rates in all. "
        "The baseline is the same network without dropout.\nDashed: skip connections "
        "(the encoder's features are copied and concatenated with the up-sampled ones).",
        ha="center",
        va="center",
        fontsize=13.8,
        bbox=dict(boxstyle="round,pad=0.4", facecolor=SAMPLING, edgecolor=EDGE),
    )

    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(out: Path = IMAGES) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "pipeline.png", out / "unet.png"]
    pipeline(paths[0])
    unet(paths[1])
    return paths


if __name__ == "__main__":
    for p in main(Path(sys.argv[1]) if len(sys.argv) > 1 else IMAGES):
        print(p)
