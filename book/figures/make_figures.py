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


def box(ax, x, y, w, h, text, color, *, size=10, weight="normal", chapter=None):
    """A rounded box centred at (x, y); ``chapter`` is written small under it."""
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
    if chapter:
        ax.text(
            x,
            y - h / 2 - 0.06,
            chapter,
            ha="center",
            va="top",
            fontsize=8,
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
    fig, ax = plt.subplots(figsize=(15, 6.4))
    ax.set_xlim(0, 15)
    ax.set_ylim(-0.35, 6.05)
    ax.axis("off")
    col = [1.0, 3.05, 5.35, 8.05, 11.0, 13.75]  # the centres of the six columns

    ax.text(
        0.15,
        5.85,
        "one deterministic pass: a segmentation",
        fontsize=11.5,
        weight="bold",
        va="center",
        color="#1f4e79",
    )
    ax.text(
        0.15,
        3.0,
        "S Monte-Carlo dropout passes: a segmentation that knows where it may be wrong",
        fontsize=11.5,
        weight="bold",
        va="center",
        color="#7f4f00",
    )

    # --- top row: image -> U-Net -> two heads -> mean-shift -> instances -> AP
    y, yh = 4.6, 1.05
    box(
        ax,
        col[0],
        y,
        1.5,
        yh,
        "image\n2 x H x W\n(fluorescence,\nbrightfield)",
        DATA,
        size=9,
        chapter="chapter 01",
    )
    box(
        ax,
        col[1],
        y,
        1.5,
        yh,
        "U-Net\n(dropout off)",
        NETWORK,
        size=10,
        weight="bold",
        chapter="chapters 02-04",
    )
    box(ax, col[2], y + 0.62, 1.9, 0.72, "embedding\n16 x H x W", NETWORK, size=9.5)
    box(
        ax,
        col[2],
        y - 0.62,
        1.9,
        0.72,
        "3 class logits\nbackground / worm /\noverlap",
        NETWORK,
        size=9,
    )
    box(
        ax,
        col[3],
        y,
        2.1,
        yh,
        "mean-shift clustering\nof the foreground\nembeddings\n+ overlap heuristic",
        POSTPROC,
        size=9,
        chapter="chapter 05",
    )
    box(
        ax,
        col[4],
        y,
        2.1,
        yh,
        "instances\nK binary masks\nK x H x W\n(may overlap)",
        DATA,
        size=9,
    )
    box(
        ax,
        col[5],
        y,
        2.1,
        yh,
        "average precision\nagainst the true worms\n(avAP, AP50, AP75)",
        EVALUATE,
        size=9,
        chapter="chapter 08",
    )
    arrow(ax, (col[0] + 0.75, y), (col[1] - 0.75, y))
    arrow(ax, (col[1] + 0.75, y + 0.25), (col[2] - 0.95, y + 0.62))
    arrow(ax, (col[1] + 0.75, y - 0.25), (col[2] - 0.95, y - 0.62))
    arrow(
        ax,
        (col[2] + 0.95, y + 0.62),
        (col[3] - 1.05, y + 0.2),
        text="points to\ncluster",
        text_offset=(-0.05, 0.12),
        size=7.5,
    )
    arrow(
        ax,
        (col[2] + 0.95, y - 0.62),
        (col[3] - 1.05, y - 0.2),
        text="which pixels\n(foreground, overlap)",
        text_offset=(0.05, -0.72),
        size=7.5,
    )
    arrow(
        ax, (col[3] + 1.05, y), (col[4] - 1.05, y), text="one mask\nper centre", size=8
    )
    arrow(ax, (col[4] + 1.05, y), (col[5] - 1.05, y))

    # --- bottom row: S draws -> S segmentations -> agglomeration -> P_k and H -> uses
    y2, yh2 = 1.55, 1.15
    box(ax, col[0], y2, 1.5, yh2, "the same\nimage", DATA, size=9.5)
    box(
        ax,
        col[1],
        y2,
        1.5,
        yh2,
        "the same U-Net,\nS times, dropout\non (a new mask\nper pass)",
        SAMPLING,
        size=8.8,
        chapter="chapters 03, 06",
    )
    box(
        ax,
        col[2],
        y2,
        1.9,
        yh2,
        "S segmentations\n(embedding + classes\n-> mean-shift,\nas above)",
        SAMPLING,
        size=8.8,
        chapter="chapter 06",
    )
    box(
        ax,
        col[3],
        y2,
        2.1,
        yh2,
        "agglomeration\nmatch the draws' instances\n(IoU, Hungarian)\nand average them",
        SAMPLING,
        size=8.8,
        chapter="chapter 07",
    )
    box(
        ax,
        col[4],
        y2 + 0.55,
        2.1,
        0.9,
        "per-instance\nprobability maps $P_k$\n(binarised at 0.75)",
        DATA,
        size=8.8,
    )
    box(
        ax,
        col[4],
        y2 - 0.75,
        2.1,
        0.9,
        "uncertainty:\nentropy $H(P_k)$\nper pixel and patch",
        EVALUATE,
        size=8.8,
    )
    box(
        ax,
        col[5],
        y2 + 0.55,
        2.1,
        0.9,
        "PAvPU: is the model\nuncertain where\nit is wrong?",
        EVALUATE,
        size=8.8,
        chapter="chapter 09",
    )
    box(
        ax,
        col[5],
        y2 - 0.95,
        2.1,
        0.9,
        "proofreading: show\na human the most\nuncertain places",
        EVALUATE,
        size=8.8,
        chapter="chapter 10",
    )
    arrow(ax, (col[0] + 0.75, y2), (col[1] - 0.75, y2))
    arrow(ax, (col[1] + 0.75, y2), (col[2] - 0.95, y2), text="S draws", size=8)
    arrow(ax, (col[2] + 0.95, y2), (col[3] - 1.05, y2))
    arrow(ax, (col[3] + 1.05, y2 + 0.2), (col[4] - 1.05, y2 + 0.55))
    arrow(ax, (col[4], y2 + 0.1), (col[4], y2 - 0.3))
    arrow(ax, (col[4] + 1.05, y2 - 0.6), (col[5] - 1.05, y2 + 0.4))
    arrow(ax, (col[4] + 1.05, y2 - 0.85), (col[5] - 1.05, y2 - 0.95))
    # the binarised maps are an instance segmentation too: evaluated like the top row's
    arrow(
        ax,
        (col[4] + 0.6, y2 + 1.0),
        (col[5] - 0.75, y - yh / 2),
        ls="--",
        color="#888888",
        text="binarised",
        text_offset=(-0.55, -0.05),
        size=8,
    )

    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def unet(path: Path) -> None:
    depth, base = 5, 19
    widths = [base * 2**i for i in range(depth)]
    fig, ax = plt.subplots(figsize=(13, 7.4))
    ax.set_xlim(-0.3, 13.4)
    ax.set_ylim(-1.1, 7.2)
    ax.axis("off")

    level_y = [6.0 - 1.3 * i for i in range(depth)]
    centre, step = 5.6, 0.8  # the bottleneck's x; the U narrows by ``step`` per level
    enc_x = [
        centre - step * (depth - 1 - i) - 0.8 * (i < depth - 1) for i in range(depth)
    ]
    dec_x = [2 * centre - x for x in enc_x]  # mirrored; the bottom level is shared
    resolution = ["H x W", "H/2 x W/2", "H/4 x W/4", "H/8 x W/8", "H/16 x W/16"]
    bw, bh = 1.3, 0.62

    ax.text(
        -0.2,
        6.75,
        "input: 2 x H x W (fluorescence, brightfield)",
        fontsize=10,
        va="center",
    )
    arrow(ax, (0.35, 6.6), (enc_x[0] - bw / 2, level_y[0] + 0.1), rad=0.25)
    for i in range(depth):
        y = level_y[i]
        ax.text(
            -0.2,
            y,
            f"level {i + 1}\n{resolution[i]}",
            fontsize=9,
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
            size=8.8,
        )
        if i < depth - 1:
            arrow(
                ax,
                (enc_x[i], y - bh / 2),
                (enc_x[i + 1] - 0.2, level_y[i + 1] + bh / 2),
                color="#c0392b",
                text="max-pool 2x2",
                text_offset=(-0.62, -0.05),
                size=8,
            )
            box(
                ax,
                dec_x[i],
                y,
                bw,
                bh,
                f"2 x conv 3x3\n+ ReLU, {widths[i]} ch",
                NETWORK,
                size=8.8,
            )
            arrow(
                ax,
                (dec_x[i + 1] + 0.2, level_y[i + 1] + bh / 2),
                (dec_x[i], y - bh / 2),
                color="#2e86c1",
                text=f"up-conv 2x2\n-> {widths[i]} ch",
                text_offset=(0.68, -0.2),
                size=8,
            )
            arrow(
                ax,
                (enc_x[i] + bw / 2, y),
                (dec_x[i] - bw / 2, y),
                color="#7f8c8d",
                ls="--",
                text=f"skip: {widths[i]} + {widths[i]} ch",
                size=8,
            )
    ax.text(
        enc_x[-1],
        level_y[-1] - 0.55,
        "bottleneck",
        ha="center",
        va="top",
        fontsize=8.5,
        style="italic",
        color="#555555",
    )

    # the two heads on the last decoder level
    hx = 12.45
    box(
        ax,
        hx,
        level_y[0] + 0.55,
        1.6,
        0.7,
        "1x1 conv\nembedding\n16 x H x W",
        POSTPROC,
        size=8.8,
    )
    box(
        ax,
        hx,
        level_y[0] - 0.95,
        1.6,
        0.7,
        "1x1 conv\n3 class logits\n3 x H x W",
        POSTPROC,
        size=8.8,
    )
    arrow(ax, (dec_x[0] + bw / 2, level_y[0] + 0.1), (hx - 0.8, level_y[0] + 0.55))
    arrow(ax, (dec_x[0] + bw / 2, level_y[0] - 0.1), (hx - 0.8, level_y[0] - 0.95))
    ax.text(
        hx,
        level_y[0] + 0.12,
        "trained with the\ndiscriminative loss",
        ha="center",
        va="top",
        fontsize=8.5,
        color="#333333",
    )
    ax.text(
        hx,
        level_y[0] - 1.38,
        "background / worm /\noverlap; cross-entropy",
        ha="center",
        va="top",
        fontsize=8.5,
        color="#333333",
    )

    ax.text(
        6.6,
        -0.45,
        "Probabilistic model: every convolution (3x3, up-conv 2x2 and both 1x1 heads) reads "
        "its input through its own\nConcrete Dropout layer with a learned rate -- "
        f"{2 * depth + 2 * (depth - 1) + (depth - 1) + 2} rates in all. "
        "The baseline is the same network without dropout.\nDashed: skip connections "
        "(the encoder's features are copied and concatenated with the up-sampled ones).",
        ha="center",
        va="center",
        fontsize=9.5,
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
