"""``diffmem report RUN_DIR ...``: one self-contained HTML file (no CDN, images embedded as data URIs).

The page leads with what was found and what to do next (flagged prompts at the calibrated FPR, the
detector to trust and why, or how to get there), then one section per run folder:

- a scan (``scores.parquet``): AUROC / TPR@1%FPR per detector when the prompts carry labels (with the
  "too few negatives" warnings of :func:`diffmem.eval.detection.detection_metrics`), ROC curves with the
  legend beside them, flag counts when the scan was calibrated, and a gallery of the top prompts by the
  run's best detector: a generation next to its nearest training image;
- an extraction (``extraction.parquet``): flag rate per attack, by prompt kind / replication rate, and
  precision / recall against labels where they exist;
- a bench (``bench.json``): one method x metric table (mean ± std over split seeds where there are several)
  and a plot of extraction, and extraction under the re-trigger, against ordinary fidelity;
- ``detection.json`` of ``diffmem eval detect`` and any other ``*.json``, as tables.

The page is meant to be forwarded: each section's settings and provenance sit in a collapsed details
block, paths are shown by their last component (:func:`diffmem.provenance.display_name`), and diffmem's
own marker files are not sections.

General code only: the gallery (which model, which training images, when a generation "replicates")
comes from the caller as ``gallery`` (see :class:`diffmem.zoo.gallery.ZooGallery`), and prompts without a
training image get no verdict. Figures with matplotlib, page with jinja2.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from jinja2 import Environment, PackageLoader, select_autoescape

from diffmem.bench_results import reattack_rate, upgrade_result
from diffmem.errors import DiffmemError
from diffmem.eval.detection import detection_metrics, roc_figure
from diffmem.images import image_grid
from diffmem.io import atomic_write_text
from diffmem.outputs import MARKER
from diffmem.provenance import display_name, is_machine_path
from diffmem.scan import score_columns

# bench metrics in the order the table shows them: results key -> column header (those a file lacks are left out)
BENCH_METRICS = {"extraction_rate": "extraction", "dori_extraction_rate": "under DoRI",
                 "tuned_retrigger_extraction_rate": "under tuned re-trigger",
                 "fidelity_ordinary_all": "fidelity, ordinary", "fidelity_memorized_all": "fidelity, memorized",
                 "fidelity": "fidelity", "fid": "FID", "parameters_changed": "parameters changed",
                 "fit_seconds": "fit s"}


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


def _gallery(context, texts: list[str], seed: int = 0) -> list[dict[str, Any]]:
    """Generation next to its nearest training image, with the similarity and the caller's verdict."""
    if not texts:
        return []
    images = context.model.sample(texts, [seed] * len(texts), num_inference_steps=25).images
    match = context.index.matcher.match(images)
    out = []
    for i, t in enumerate(texts):
        similarity = float(match.similarity[i])
        pair = image_grid([_pair(images[i], context.index.images[match.index[i]])], scale=4)
        out.append({"text": t, "similarity": similarity, "image": png_data_uri(pair),
                    "replicates": context.replicates(t, similarity)})
    return out


def _pair(a, b):
    import torch

    return torch.stack([a, b])


def _metrics(y: np.ndarray, names: list[str], scores: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    rows = []
    for n in names:
        m = detection_metrics(y, scores[n])
        t1 = m["tpr@0.01fpr"]
        rows.append({"detector": n, "auroc": m["auroc"], "tpr1": t1["strict"], "tpr1c": t1["closest"],
                     "npos": m["n_pos"], "nneg": m["n_neg"], "warning": t1.get("warning")})
    return rows


def best_detector(metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The detector to trust: highest TPR at 1% FPR (strict), ties broken by AUROC."""
    return max(metrics, key=lambda m: (m["tpr1"], m["auroc"])) if metrics else None


def scan_section(folder: Path, table, gallery_size: int, gallery: Callable | None = None) -> dict[str, Any]:
    prov = json.loads((folder / "provenance.json").read_text())
    names = score_columns(table)
    scores = {n: table.column(n).to_numpy(zero_copy_only=False).astype(float) for n in names}
    y = _labels(table)
    section: dict[str, Any] = {"kind": "scan", "folder": display_name(folder), "provenance": prov,
                               "settings": provenance_rows(prov), "n": table.num_rows,
                               "detectors": names, "metrics": [], "roc": None, "gallery": [], "flags": None,
                               "best": None, "labels": None}
    if y is not None:
        section["labels"] = {"memorized": int(y.sum()), "ordinary": int((~y).sum())}
    if y is not None and 0 < y.sum() < len(y):
        section["metrics"] = _metrics(y, names, scores)
        section["best"] = best_detector(section["metrics"])
        section["roc"] = png_data_uri(roc_figure({n: (y, scores[n]) for n in names}, legend_outside=True))
    if "flagged" in table.column_names:
        flagging = prov.get("flagging", {})
        section["flags"] = {"n": int(sum(bool(v) for v in table.column("flagged").to_pylist())),
                            "fpr": flagging.get("fpr"), "rule": flagging.get("combined_rule"),
                            "per_detector": {n: int(sum(bool(v) for v in table.column(f"flagged_{n}").to_pylist()))
                                             for n in names if f"flagged_{n}" in table.column_names},
                            "warnings": flagging.get("warnings", [])}
    context = gallery(folder) if gallery is not None and gallery_size else None
    if context is not None and names:
        by = section["best"]["detector"] if section["best"] else names[0]
        s = np.nan_to_num(scores[by], nan=-np.inf)
        top = np.argsort(-s, kind="stable")[:gallery_size]
        section["gallery_by"] = by
        section["gallery_why"] = ("the best detector of this run (TPR at 1% FPR against its labels)"
                                  if section["best"] else "the first detector (no labels to rank detectors by)")
        section["gallery"] = _gallery(context, [table.column("text")[int(i)].as_py() for i in top])
        for g, i in zip(section["gallery"], top):
            g["score"] = float(scores[by][i])
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
            row["unattributed"] = int((labels == "unattributed").sum())
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
    return {"kind": "extraction", "folder": display_name(folder), "provenance": prov,
            "settings": provenance_rows(prov), "n": table.num_rows, "rows": rows}


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v[:8]) + (f" ... ({len(v)})" if len(v) > 8 else "")
    return str(v)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``a.b.c -> scalar`` (lists of scalars kept, lists of dicts counted)."""
    out: dict[str, Any] = {}
    if not isinstance(d, dict):
        return {prefix.rstrip(".") or "value": d}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        elif isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v):
            out[f"{prefix}{k}"] = f"{len(v)} entries"
        else:
            out[f"{prefix}{k}"] = v
    return out


def json_tables(data: Any, max_columns: int = 14, max_rows: int = 80) -> list[dict[str, Any]]:
    """A results JSON as tables: each mapping of name -> record (bench methods, detectors) becomes one table
    with a row per name; everything else one key / value table."""
    tables, rest = [], {}
    for key, value in (data.items() if isinstance(data, dict) else [("value", data)]):
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            flat = {name: _flatten(rec) for name, rec in value.items()}
            columns: list[str] = []
            for rec in flat.values():
                columns += [c for c in rec if c not in columns]
            columns = columns[:max_columns]
            tables.append({"title": key, "columns": [key, *columns],
                           "rows": [[name, *(_fmt(rec.get(c)) for c in columns)] for name, rec in
                                    list(flat.items())[:max_rows]]})
        else:
            rest[key] = value
    if rest:
        flat = _flatten(rest)
        tables.insert(0, {"title": "settings", "columns": ["key", "value"],
                          "rows": [[k, _fmt(v)] for k, v in list(flat.items())[:max_rows]]})
    return tables


def _shown(value: Any) -> Any:
    """A value as the page shows it: an absolute path by its last component."""
    if isinstance(value, dict):
        return {k: _shown(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shown(v) for v in value]
    return display_name(value) if is_machine_path(value) else value


def provenance_rows(prov: dict[str, Any], max_rows: int = 200) -> list[list[str]]:
    """A provenance record as ``key / value`` rows for the collapsed details block (paths shown as names)."""
    return [[k, _fmt(v)] for k, v in list(_flatten(_shown(prov)).items())[:max_rows]]


def is_bench(data: Any) -> bool:
    """Whether a results JSON is ``diffmem bench``'s: ``results`` maps each method to its measured figures."""
    results = data.get("results") if isinstance(data, dict) else None
    return (isinstance(results, dict) and bool(results)
            and all(isinstance(r, dict) and "extraction_rate" in r for r in results.values()))


def _reattack(r: dict[str, Any]) -> float | None:
    """A result row's extraction under re-trigger: DoRI's when measured, else the tuned attack's."""
    try:
        return reattack_rate(r)
    except KeyError:
        return None


def _bench_figure(results: dict[str, dict]):
    """Extraction (filled) and extraction under the re-trigger (open) against ordinary fidelity, one colour a
    method: the trade-off a reader weighs (low and to the right is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fidelity = "fidelity_ordinary_all" if any("fidelity_ordinary_all" in r for r in results.values()) else "fidelity"
    fig, ax = plt.subplots(figsize=(7.2, 3.6))
    for i, (name, r) in enumerate(results.items()):
        if r.get(fidelity) is None:
            continue
        colour = f"C{i % 10}"
        ax.scatter(r[fidelity], r["extraction_rate"], color=colour, label=name)
        again = _reattack(r)
        if again is not None:
            ax.scatter(r[fidelity], again, facecolors="none", edgecolors=colour)
            ax.plot([r[fidelity]] * 2, [r["extraction_rate"], again], color=colour, lw=0.6)
    ax.set_xlabel(f"{BENCH_METRICS[fidelity]} (higher is better)")
    ax.set_ylabel("extraction: plain (filled),\nunder re-trigger (open; DoRI\nwhen measured)")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, frameon=False)
    fig.tight_layout()
    return fig


def bench_section(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """``bench.json`` as one method x metric table (mean ± std where there are several split seeds), the
    extraction-against-fidelity plot, and its settings for the details block. Files written before the
    re-trigger keys were renamed are read with their figures under the current names."""
    results = {name: upgrade_result(r) for name, r in data["results"].items()}
    columns = [k for k in BENCH_METRICS if any(r.get(k) is not None for r in results.values())]
    if "fidelity_ordinary_all" in columns and "fidelity" in columns:
        columns.remove("fidelity")  # the same read-back as "fidelity, ordinary" in files that have both

    def cell(r: dict[str, Any], key: str) -> str:
        if r.get(key) is None:
            return ""
        std = r.get(f"{key}_std")
        value = f"{r[key]:.0f}" if key in ("parameters_changed", "fit_seconds", "fid") else f"{r[key]:.3f}"
        return value + (f" ± {std:.3f}" if std and key not in ("parameters_changed", "fit_seconds", "fid") else "")

    rows = [[name, r.get("acts_at") or "", *(cell(r, k) for k in columns)] for name, r in results.items()]
    seeds = sorted(data.get("runs", {}), key=str)
    settings = {k: v for k, v in data.items() if k not in ("results", "runs")}
    return {"kind": "bench", "folder": display_name(path.parent), "title": path.name, "results": results,
            "columns": ["method", "acts at", *(BENCH_METRICS[k] for k in columns)], "rows": rows,
            "seeds": seeds, "plot": png_data_uri(_bench_figure(results)), "settings": provenance_rows(settings)}


def json_section(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DiffmemError(f"results file '{path}' is not valid JSON ({exc})") from exc
    if is_bench(data):
        return bench_section(path, data)
    tables = json_tables(_shown(data))
    settings = [t for t in tables if t["title"] == "settings"]
    return {"kind": "json", "folder": display_name(path.parent), "title": path.name,
            "tables": [t for t in tables if t["title"] != "settings"],
            "settings": settings[0]["rows"] if settings else []}


def bench_findings(section: dict[str, Any]) -> list[str]:
    """The bench in one sentence: the method that leaves the least extraction under the re-trigger (then the
    least extraction, then the most ordinary fidelity), against the unmitigated model."""
    results = section["results"]
    fidelity = "fidelity_ordinary_all" if any("fidelity_ordinary_all" in r for r in results.values()) else "fidelity"
    methods = {k: r for k, r in results.items() if k != "none"}
    if not methods:
        return []

    def key(item: tuple[str, dict]) -> tuple[float, float, float]:
        r = item[1]
        again = _reattack(r)
        return (r["extraction_rate"] if again is None else again, r["extraction_rate"], -(r.get(fidelity) or 0))

    name, best = min(methods.items(), key=key)
    base = results.get("none", {})

    def change(k: str) -> str:
        return f"{base[k]:.3f} to {best[k]:.3f}" if base.get(k) is not None else f"{best[k]:.3f}"

    parts = [f"extraction {change('extraction_rate')}"]
    for k in ("dori_extraction_rate", "tuned_retrigger_extraction_rate"):
        if best.get(k) is not None:
            parts.append(f"{BENCH_METRICS[k]} {change(k)}")
    if best.get(fidelity) is not None:
        parts.append(f"{BENCH_METRICS[fidelity]} {change(fidelity)}")
    return [f"mitigation benchmark ({section['folder']}): {name} copies least: " + ", ".join(parts) + "."]


def findings(sections: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """What the runs found and what to do next, in plain sentences (the top of the page; escaped there)."""
    found, next_steps = [], []
    for s in sections:
        if s["kind"] == "scan":
            where = f"scan of {s['n']} prompts ({s['folder']})"
            if s["flags"] is not None:
                f = s["flags"]
                rule = "the min-p combination of all detectors" if f["rule"] == "min-p" else f["rule"]
                per = ", ".join(f"{k} {v}" for k, v in f["per_detector"].items())
                found.append(f"{where}: {f['n']} prompt(s) flagged at the calibrated false-positive rate "
                             f"{_fmt(f['fpr'])} overall ({rule}); per detector at that rate: {per}.")
                found += [f"warning: {w}" for w in f["warnings"]]
                if f["n"]:
                    next_steps.append(f"Confirm the {f['n']} flagged prompt(s) (column `flagged` of "
                                      f"{s['folder']}/scores.parquet) with `diffmem extract` against your "
                                      "training images, then mitigate (`diffmem mitigate METHOD`).")
            if s["best"] is not None:
                b = s["best"]
                found.append(f"{where}: trust {b['detector']}: TPR {b['tpr1']:.3f} at 1% FPR (AUROC "
                             f"{b['auroc']:.3f}) on {b['npos']} memorized / {b['nneg']} ordinary labelled prompts, "
                             "the best of the detectors run.")
                if b.get("warning"):
                    found.append(f"warning: {b['warning']}; the TPR at 1% FPR is not measured, label more "
                                 "ordinary prompts.")
                next_steps.append(f"Scan new prompts with `--detector {b['detector']}`.")
            if s["flags"] is None and s["best"] is None:
                found.append(f"{where}: scores only (no labels, no calibration), so they rank prompts but do not "
                             "say how many are memorized.")
                next_steps.append("Calibrate on prompts known to be ordinary (`diffmem calibrate --prompts "
                                  "ORDINARY.txt`), then rescan with `--calibration "
                                  "<dir>/calibration.json --fpr 0.01` to flag prompts at a stated "
                                  "false-positive rate.")
        elif s["kind"] == "bench":
            found += bench_findings(s)
        elif s["kind"] == "extraction":
            for r in s["rows"]:
                found.append(f"extraction ({s['folder']}): {r['attack']} matched a training image for "
                             f"{r['flag_rate']:.1%} of {s['n']} prompts.")
    return found, list(dict.fromkeys(next_steps))


def build_report(run_dirs: list[str | Path], out: str | Path, gallery_size: int = 6,
                 gallery: Callable | None = None) -> Path:
    """Write the HTML report of ``run_dirs`` to ``out``.

    ``gallery(folder)`` returns a context with a model, a training index and a replication verdict for a
    scan folder, or None (no gallery); e.g. :class:`diffmem.zoo.gallery.ZooGallery` for zoo runs.
    """
    sections = []
    for d in map(Path, run_dirs):
        if not d.exists():
            raise DiffmemError(f"run folder '{d}' does not exist")
        if (d / "scores.parquet").is_file():
            sections.append(scan_section(d, pq.read_table(d / "scores.parquet"), gallery_size, gallery))
        if (d / "extraction.parquet").is_file():
            sections.append(extraction_section(d, pq.read_table(d / "extraction.parquet")))
        for j in sorted(d.glob("*.json")) if d.is_dir() else [d]:
            if j.name not in ("provenance.json", "calibration.json", MARKER) and j.suffix == ".json" \
                    and not j.name.startswith("."):
                sections.append(json_section(j))
    if not sections:
        raise DiffmemError(f"no scan, extraction or JSON results found in {[str(d) for d in run_dirs]}")
    found, next_steps = findings(sections)
    env = Environment(loader=PackageLoader("diffmem", "templates"), autoescape=select_autoescape(["html", "j2"]))
    page = env.get_template("report.html.j2").render(sections=sections, findings=found, next_steps=next_steps)
    return atomic_write_text(Path(out), page)
