"""Report of the simulated benchmark: Markdown + JSON + PNGs (paper Tables 2-4, confusion matrices, landmark slices).

Every method of the comparison appears: methods that ran get their scores, the others are listed as "not run" with
the reason (e.g. no weights yet). Plots use matplotlib's object-oriented Figure API (no display, no pyplot state).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from scripts.evaluation.landmark_metrics import TOTAL, to_json
from scripts.utils.atomic_write import atomic_write_text
from scripts.utils.constants import CLASS_NAMES

CLASS_COLOURS = ("#2ca02c", "#ffbf00", "#d62728")  # green / yellow / red as in the paper's Fig. 4


def _pct(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.1f}"


def _kappa(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.2f}"


def table2_markdown(methods: dict[str, dict]) -> str:
    """Paper Table 2: per registration setting and total, one row per method that ran."""
    ran = {name: m for name, m in methods.items() if m.get("status") == "ran"}
    lines = [
        "| registration | method | F1 c | F1 p | F1 w | mean F1 | Acc | kappa | cw | n |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    settings: list[str] = []
    for m in ran.values():
        settings += [s for s in m["scores"] if s not in settings]
    settings = [s for s in settings if s != TOTAL] + [TOTAL]
    for setting in settings:
        for name, m in ran.items():
            s = m["scores"].get(setting)
            if s is None:
                continue
            label = f"{name} (carried)" if m.get("carried_from") else name
            lines.append(
                f"| {setting} | {label} | {_pct(s['f1_correct'])} | {_pct(s['f1_poor'])} | {_pct(s['f1_wrong'])} | "
                f"{_pct(s['mean_f1'])} | {_pct(s['accuracy'])} | {_kappa(s['kappa'])} | {s['cw']} | {s['n']} |"
            )
    return "\n".join(lines)


def not_run_markdown(methods: dict[str, dict]) -> str:
    """The methods that did not run, with their reasons."""
    rows = [
        f"- **{name}**: not run ({m.get('reason', 'no reason given')})"
        for name, m in methods.items()
        if m.get("status") != "ran"
    ]
    return "\n".join(rows) if rows else "- (every method ran)"


def table3_markdown(scores: dict) -> str:
    """Paper Table 3: confusion matrix of the total, rows predicted (P), columns actual (A)."""
    matrix = np.array(scores[TOTAL]["confusion"]).T  # stored rows = actual; the paper prints rows = predicted
    short = [n[0] for n in CLASS_NAMES]
    lines = ["| | " + " | ".join(f"A {c}" for c in short) + " |", "|---" * (len(short) + 1) + "|"]
    for i, c in enumerate(short):
        lines.append(f"| P {c} | " + " | ".join(str(v) for v in matrix[i]) + " |")
    return "\n".join(lines)


def table4_markdown(scores: dict) -> str:
    """Paper Table 4: the total scored at each earlier LSTM step on its own groups, then the final 3 classes."""
    total = scores[TOTAL]
    steps = total.get("steps", {})
    if not steps:
        return "(no per-step columns `step1`, `step2` in the prediction CSVs)"
    lines = ["| step | groups: F1 | mean F1 | Acc | kappa |", "|---|---|---|---|---|"]
    for name, s in steps.items():
        f1 = ", ".join(f"{k[3:]}: {_pct(v)}" for k, v in s.items() if k.startswith("f1_"))
        lines.append(f"| {name} | {f1} | {_pct(s['mean_f1'])} | {_pct(s['accuracy'])} | {_kappa(s['kappa'])} |")
    f1 = ", ".join(f"{c}: {_pct(total['f1_' + c])}" for c in CLASS_NAMES)
    lines.append(
        f"| final (merged) | {f1} | {_pct(total['mean_f1'])} | {_pct(total['accuracy'])} | {_kappa(total['kappa'])} |"
    )
    return "\n".join(lines)


def plot_confusion(scores: dict, title: str, path: Path) -> Path:
    """Confusion-matrix PNG of the total (rows actual, columns predicted).

    Args:
        scores: a method's scores (``scripts.evaluation.landmark_metrics.evaluate``) with a ``total`` entry.
        title: figure title.
        path: PNG file to write (its folder is created).

    Returns:
        ``path``.
    """
    matrix = np.array(scores[TOTAL]["confusion"])
    fig = Figure(figsize=(4, 3.6))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="black")
    ax.set_xticks(range(3), CLASS_NAMES)
    ax.set_yticks(range(3), CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual (TRE)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def ground_truth_markdown(truth: dict[str, dict]) -> str:
    """Landmarks per true class and TRE statistics per registration setting."""
    lines = [
        "| registration | correct | poor | wrong | mean TRE (mm) | median | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting, t in truth.items():
        c = t["counts"]
        lines.append(f"| {setting} | {c[0]} | {c[1]} | {c[2]} | {t['mean']:.2f} | {t['median']:.2f} | {t['max']:.2f} |")
    total = np.sum([t["counts"] for t in truth.values()], axis=0)
    shares = " / ".join(f"{100 * c / max(total.sum(), 1):.0f} %" for c in total)
    lines.append(f"| **total** | {total[0]} | {total[1]} | {total[2]} | ({shares}) | | |")
    return "\n".join(lines)


def error_markdown(methods: dict[str, dict]) -> str:
    """Methods that estimate the misalignment in mm (``error_mm``): MAE and Spearman against the true TRE."""
    lines = ["| registration | method | MAE (mm) | Spearman | n |", "|---|---|---|---|---|"]
    for name, m in methods.items():
        for setting, s in m.get("error_mm", {}).items() if m.get("status") == "ran" else ():
            lines.append(f"| {setting} | {name} | {s['mae_mm']:.2f} | {s['spearman']:.2f} | {s['n']} |")
    return "\n".join(lines) if len(lines) > 2 else "(no method estimates the misalignment in mm)"


def plot_mean_f1(methods: dict[str, dict], path: Path) -> Path:
    """Bar chart of the mean F1 (%) per registration setting and in total, one bar per method that ran.

    Args:
        methods: method name -> entry with ``status`` and, when it ran, ``scores`` per setting.
        path: PNG file to write (its folder is created).

    Returns:
        ``path``.
    """
    ran = {name: m["scores"] for name, m in methods.items() if m.get("status") == "ran"}
    settings: list[str] = []
    for scores in ran.values():
        settings += [s for s in scores if s not in settings and s != TOTAL]
    settings.append(TOTAL)
    fig = Figure(figsize=(max(6.0, 1.1 * len(settings) * max(1, len(ran)) / 2), 4.2))
    ax = fig.subplots()
    width = 0.8 / max(len(ran), 1)
    for k, (name, scores) in enumerate(ran.items()):
        values = [100 * scores[s]["mean_f1"] if s in scores else np.nan for s in settings]
        ax.bar(np.arange(len(settings)) + (k - (len(ran) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(range(len(settings)), settings, rotation=30, ha="right")
    ax.set_xlabel("registration setting")
    ax.set_ylabel("mean F1 of the three classes (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Landmark mean F1 per registration setting")
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _rounded(value, digits: int = 2):
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return value


def setup_markdown(setup: dict) -> str:
    """One bullet per setup entry, nested values as compact JSON with floats rounded to 0.01."""
    return "\n".join(f"- **{k}**: `{json.dumps(_rounded(v), ensure_ascii=False)}`" for k, v in setup.items())


def timing_markdown(timing: dict) -> str:
    """Seconds per stage."""
    lines = ["| stage | seconds |", "|---|---|"]
    for name, value in timing.items():
        lines.append(f"| {name} | {value:.1f} |")
    return "\n".join(lines)


def write_report(result: dict, output_dir: str | Path) -> dict[str, str]:
    """Write ``report.md``, ``report.json`` and the confusion PNGs of every method that ran into ``output_dir``.

    Args:
        result: the benchmark result (``description``, ``setup``, ``ground_truth``, ``methods``, ``figures``,
            ``timing``).
        output_dir: report folder (created if missing).

    Returns:
        Dict file role -> written path (``markdown``, ``json``, the PNGs).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    methods = result["methods"]
    if any(m.get("status") == "ran" for m in methods.values()):
        files["mean_f1_per_setting"] = str(plot_mean_f1(methods, out / "mean_f1_per_setting.png"))
    sections = [
        "# Simulated misalignment benchmark",
        "",
        result.get("description", ""),
        "",
        "## Setup",
        "",
        setup_markdown(result.get("setup", {})),
        "",
        "## Ground truth: landmarks per class (true TRE)",
        "",
        ground_truth_markdown(result["ground_truth"]),
        "",
        "## Table 2: landmark-based results per registration setting",
        "",
        table2_markdown(methods),
        "",
        "![mean F1 per setting](mean_f1_per_setting.png)",
        "",
        "## Estimated misalignment in mm against the true TRE",
        "",
        error_markdown(methods),
        "",
        "Methods not run:",
        "",
        not_run_markdown(methods),
        "",
    ]
    for name, m in methods.items():
        if m.get("status") != "ran":
            continue
        slug = "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
        png = plot_confusion(m["scores"], f"{name}, all settings", out / f"confusion_{slug}.png")
        files[f"confusion_{slug}"] = str(png)
        sections += [
            f"## {name}: Table 3, confusion matrix (all settings)",
            "",
            table3_markdown(m["scores"]),
            "",
            f"![confusion {name}]({png.name})",
            "",
        ]
        if m["scores"][TOTAL].get("steps"):  # only the LSTM decoder has per-step outputs
            sections += [f"## {name}: Table 4, per LSTM step (all settings)", "", table4_markdown(m["scores"]), ""]
    for name, path in result.get("figures", {}).items():
        sections += [f"![{name}]({Path(path).name})", ""]
    for name, path in result.get("figures_outside_report", {}).items():
        sections += [f"Figure '{name}' (slices of the scan) was written outside the report: `{path}`.", ""]
    sections += ["## Timing (2 CPU cores unless stated)", "", timing_markdown(result.get("timing", {})), ""]
    files["markdown"] = str(atomic_write_text(out / "report.md", "\n".join(sections)))
    files["json"] = str(atomic_write_text(out / "report.json", to_json(result)))
    return files


def plot_landmark_slices(
    fixed: np.ndarray,
    deformed: np.ndarray,
    landmark_voxels: np.ndarray,
    classes: np.ndarray,
    spacing: tuple[float, float, float],
    title: str,
    path: Path,
) -> Path:
    """Fig. 4-style view: fixed and deformed moving (z, y, x) on the axial and coronal slice holding most
    landmarks, landmarks within 3 slices coloured by class (green/yellow/red); ``landmark_voxels`` are (x, y, z).

    Args:
        fixed: ``(z, y, x)`` fixed image, HU.
        deformed: ``(z, y, x)`` deformed moving image on the same grid, HU.
        landmark_voxels: ``[N, 3]`` continuous voxel indices, x-y-z order.
        classes: ``[N]`` class per landmark (0, 1, 2).
        spacing: voxel spacing in mm, x-y-z order (sets the coronal aspect ratio).
        title: figure title.
        path: PNG file to write (its folder is created).

    Returns:
        ``path``.
    """
    z = int(np.bincount(np.round(landmark_voxels[:, 2]).astype(int).clip(0, fixed.shape[0] - 1)).argmax())
    y = int(np.bincount(np.round(landmark_voxels[:, 1]).astype(int).clip(0, fixed.shape[1] - 1)).argmax())
    fig = Figure(figsize=(9, 8))
    axes = fig.subplots(2, 2)
    aspect = spacing[2] / spacing[0]
    for col, (image, name) in enumerate(((fixed, "fixed"), (deformed, "deformed moving"))):
        axes[0, col].imshow(image[z], cmap="gray", vmin=-1000, vmax=300)
        axes[1, col].imshow(image[:, y, :], cmap="gray", vmin=-1000, vmax=300, aspect=aspect, origin="lower")
        axes[0, col].set_title(f"{name}, axial", fontsize=9)
        axes[1, col].set_title(f"{name}, coronal", fontsize=9)
        near_z = np.abs(landmark_voxels[:, 2] - z) <= 3
        near_y = np.abs(landmark_voxels[:, 1] - y) <= 3
        for k, colour in enumerate(CLASS_COLOURS):
            sel = classes == k
            axes[0, col].scatter(*landmark_voxels[sel & near_z][:, :2].T, s=14, c=colour, edgecolors="k")
            axes[1, col].scatter(*landmark_voxels[sel & near_y][:, [0, 2]].T, s=14, c=colour, edgecolors="k")
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path
