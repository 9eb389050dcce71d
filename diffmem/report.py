"""``diffmem report RUN_DIR ...``: one self-contained HTML file (no CDN, images embedded as data URIs).

Reads every run folder it is given and shows what it finds:

- a scan (``scores.parquet``): ROC curves and AUROC / TPR@1%FPR per detector when the prompts carry
  labels (the zoo's do), and a gallery of the top-ranked prompts: a generation next to its nearest
  training image with the similarity;
- an extraction (``extraction.parquet``): extraction rate per attack, by prompt kind / replication
  rate, and precision / recall of each attack's flag against the labels where they exist;
- ``detection.json`` of ``diffmem eval detect`` and any ``*.json`` benchmark table, as tables.

Figures with matplotlib, page with jinja2.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from jinja2 import Environment, PackageLoader, select_autoescape

from diffmem.errors import DiffmemError
from diffmem.io import atomic_write_text


def png_data_uri(fig_or_image) -> str:
    """A matplotlib figure or PIL image as a base64 PNG data URI."""
    buf = io.BytesIO()
    if hasattr(fig_or_image, "savefig"):
        fig_or_image.savefig(buf, format="png", dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig_or_image)
    else:
        fig_or_image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _labels(table) -> np.ndarray | None:
    if "input_memorized" not in table.column_names:
        return None
    return np.array([str(v).lower() in ("true", "1") for v in table.column("input_memorized").to_pylist()])


def _roc_figure(y: np.ndarray, scores: dict[str, np.ndarray]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, s in scores.items():
        ok = np.isfinite(s)
        fpr, tpr, _ = roc_curve(y[ok], s[ok])
        ax.plot(np.clip(fpr, 1e-4, 1), tpr, label=name)
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 1)
    ax.axvline(0.01, color="gray", lw=0.5, ls="--")
    ax.set_xlabel("false-positive rate (log)")
    ax.set_ylabel("true-positive rate")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def _gallery(model, texts: list[str], index, seed: int = 0) -> list[dict[str, Any]]:
    """Generation next to its nearest training image, with the similarity, for each text."""
    from diffmem.cli.demo import image_grid

    if not texts:
        return []
    from diffmem.zoo.corpus import parse_generic_caption
    from diffmem.zoo.paths import zoo_dir

    thresholds = json.loads((zoo_dir() / "zoo.json").read_text())["labels"]["thresholds"]
    images = model.sample(texts, [seed] * len(texts), num_inference_steps=25).images
    match = index.matcher.match(images)
    out = []
    for i, t in enumerate(texts):
        try:  # the zoo's per-family threshold: single-object captions need a near-exact copy
            parse_generic_caption(t)
            threshold = thresholds["object"]["threshold"]
        except ValueError:
            threshold = thresholds["scene"]["threshold"]
        pair = image_grid([torch_stack(images[i], index.images[match.index[i]])], scale=4)
        out.append({"text": t, "similarity": float(match.similarity[i]), "image": png_data_uri(pair),
                    "replicates": bool(match.similarity[i] > threshold)})
    return out


def torch_stack(a, b):
    import torch

    return torch.stack([a, b])


def scan_section(folder: Path, table, gallery_size: int, context: dict) -> dict[str, Any]:
    from diffmem.eval.detection import detection_metrics

    prov = json.loads((folder / "provenance.json").read_text())
    names = [c for c in table.column_names if c not in ("id", "text") and not c.startswith(("flagged", "input_"))]
    scores = {n: table.column(n).to_numpy(zero_copy_only=False).astype(float) for n in names}
    y = _labels(table)
    section: dict[str, Any] = {"kind": "scan", "folder": str(folder), "provenance": prov, "n": table.num_rows,
                               "metrics": [], "roc": None, "gallery": []}
    if y is not None and 0 < y.sum() < len(y):
        for n in names:
            m = detection_metrics(y, scores[n])
            section["metrics"].append({"detector": n, "auroc": m["auroc"], "tpr1": m["tpr@0.01fpr"]["strict"],
                                       "tpr1c": m["tpr@0.01fpr"]["closest"], "npos": m["n_pos"], "nneg": m["n_neg"]})
        section["roc"] = png_data_uri(_roc_figure(y, scores))
    if gallery_size and names and context.get("model") is not None:
        s = np.nan_to_num(scores[names[0]], nan=-np.inf)
        top = np.argsort(-s, kind="stable")[:gallery_size]
        section["gallery_by"] = names[0]
        section["gallery"] = _gallery(context["model"], [table.column("text")[int(i)].as_py() for i in top],
                                      context["index"])
        for g, i in zip(section["gallery"], top):
            g["score"] = float(scores[names[0]][i])
            g["label"] = None if y is None else bool(y[i])
    return section


def extraction_section(folder: Path, table) -> dict[str, Any]:
    prov = json.loads((folder / "provenance.json").read_text())
    attacks = [a["name"] for a in prov["attacks"]]
    y = _labels(table)
    kinds = table.column("input_kind").to_pylist() if "input_kind" in table.column_names else None
    rows = []
    for a in attacks:
        flagged = np.array(table.column(f"{a}.flagged").to_pylist(), dtype=bool)
        row: dict[str, Any] = {"attack": a, "flag_rate": float(flagged.mean())}
        if f"{a}.match_label" in table.column_names:
            labels = np.array(table.column(f"{a}.match_label").to_pylist())
            row["matching_verbatim"] = int((labels == "matching_verbatim").sum())
            row["template_verbatim"] = int((labels == "template_verbatim").sum())
        if y is not None:
            tp = int((flagged & y).sum())
            row["precision"] = tp / max(int(flagged.sum()), 1)
            row["recall"] = tp / max(int(y.sum()), 1)
        if kinds is not None:
            row["by_kind"] = {k: float(flagged[np.array(kinds) == k].mean()) for k in sorted(set(kinds))}
        if kinds is not None and "input_replication" in table.column_names:
            reps = np.array(table.column("input_replication").to_pylist())
            sig = np.array(kinds) == "signature"
            row["by_replication"] = {f"{r}x": float(flagged[sig & (reps == r)].mean())
                                     for r in sorted(set(reps[sig]), key=int)}
        rows.append(row)
    return {"kind": "extraction", "folder": str(folder), "provenance": prov, "n": table.num_rows, "rows": rows}


def json_section(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    return {"kind": "json", "folder": str(path), "title": path.name,
            "body": html.escape(json.dumps(data, indent=1)[:20000])}


def _ran_on_zoo(folder: Path) -> bool:
    """Galleries need the training set: drawn only for runs on the embedded zoo."""
    try:
        from diffmem.zoo.paths import zoo_pipeline_path

        source = json.loads((folder / "provenance.json").read_text())["model"]["source"]
        return Path(source) == zoo_pipeline_path().resolve()
    except (DiffmemError, KeyError, OSError):
        return False


def build_report(run_dirs: list[str | Path], out: str | Path, gallery_size: int = 6, model=None) -> Path:
    """Write the HTML report of ``run_dirs`` to ``out``; ``model`` (default: the zoo) draws the galleries."""
    sections = []
    context: dict[str, Any] = {"model": None, "index": None}
    for d in map(Path, run_dirs):
        if not d.exists():
            raise DiffmemError(f"run folder '{d}' does not exist")
        if (d / "scores.parquet").is_file():
            on_zoo = _ran_on_zoo(d)
            if context["model"] is None and gallery_size and on_zoo:
                from diffmem.models.loader import load_model
                from diffmem.extract import zoo_training_index

                context["model"] = model if model is not None else load_model()
                context["index"] = zoo_training_index()
            sections.append(scan_section(d, pq.read_table(d / "scores.parquet"), gallery_size if on_zoo else 0,
                                         context))
        if (d / "extraction.parquet").is_file():
            sections.append(extraction_section(d, pq.read_table(d / "extraction.parquet")))
        for j in sorted(d.glob("*.json")) if d.is_dir() else [d]:
            if j.name not in ("provenance.json", "calibration.json") and j.suffix == ".json":
                sections.append(json_section(j))
    if not sections:
        raise DiffmemError(f"no scan, extraction or JSON results found in {[str(d) for d in run_dirs]}")
    env = Environment(loader=PackageLoader("diffmem", "templates"), autoescape=select_autoescape(["html", "j2"]))
    page = env.get_template("report.html.j2").render(sections=sections)
    return atomic_write_text(Path(out), page)


def run_report_command(args) -> None:
    """``diffmem report RUN_DIR ... --out FILE``: refuses to replace a file it did not write, or an input."""
    from diffmem.outputs import REPORT_SIGNATURE, check_output_file

    # a new report may sit inside a run folder; an input file or a file we did not write is never replaced
    check_output_file(args.out, [r for r in args.runs if Path(r).is_file()], args.force, signature=REPORT_SIGNATURE)
    print(f"report: {build_report(args.runs, args.out, args.gallery)}")
