"""Benchmark: what `diffmem scan` costs as the prompt list grows (1k, 10k, 100k), and what a kill costs.

Each point runs the real command line in a child process,

    diffmem scan --prompts <n prompts> --detector noise-norm --draws 4 --quiet --out <folder>

and records its wall time and CPU time (``ru_utime + ru_stime``: on a shared machine the CPU seconds per
prompt are the load-independent cost), per-prompt time (overall and steady state, from the parts' write times),
the child's peak RSS (``os.wait4`` rusage, i.e. ``getrusage(RUSAGE_CHILDREN)`` of that child alone), an
RSS timeline sampled from ``/proc``, the Parquet part count, the time to merge the parts again (checked
equal to the command's own ``scores.parquet``) and the lines the command printed.

The resume test (at 10k by default) SIGKILLs a scan once half its parts are written, reruns the same
command, counts the parts written after the restart (rework = those beyond the parts still missing at
the kill) and checks the final table equals the uninterrupted run's table exactly.

The prompt set is generated: the zoo's caption grammar (single-object and two-object scene captions) and
every prompt list in the folder ``--prompt-lists`` (or ``$DIFFMEM_PROMPT_LISTS``; none if neither is given),
deduplicated and shuffled with a fixed seed; the n-prompt set is the first n, so the sets are nested. The shipped
figures used a folder of five public prompt lists (:data:`SHIPPED_LISTS`).

    nice -n 10 .venv/bin/python benchmarks/scan_growth.py --prompt-lists DIR --sizes 1000 10000 --resume-test 10000
    nice -n 10 .venv/bin/python benchmarks/scan_growth.py --prompt-lists DIR --sizes 100000  # ~40 min, 2 cores
    nice -n 10 .venv/bin/python benchmarks/scan_growth.py --sizes --synthetic 1000 10000 100000 1000000

Every finished point is saved at once in ``--out`` (finished points are skipped on a rerun, and an
interrupted point resumes where its scan stopped, marked ``"interrupted": true``); ``--plot`` redraws the
figure from the JSON alone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# the prompt lists of the shipped figures (memorized and ordinary LAION prompts of NeMo and of the anisotropy work)
SHIPPED_LISTS = ("anisotropy_sd1_nmem.txt", "anisotropy_sd2_mem.jsonl", "nemo_memorized_laion_prompts.csv",
                 "nemo_unmemorized_laion_prompts.csv", "sdv1_500_memorized.jsonl")
PROMPT_LISTS: Path | None = Path(os.environ["DIFFMEM_PROMPT_LISTS"]) if os.environ.get("DIFFMEM_PROMPT_LISTS") else None
DRAWS, BATCH = 4, 64


# ------------------------------------------------------------------------------------------- prompts
def zoo_grammar_captions(n_three: int = 40_000, seed: int = 0) -> list[str]:
    """Every single-object and two-object scene caption of the zoo grammar (83,200) and ``n_three`` seeded
    three-object scene captions (the grammar's scene template with one more object)."""
    from diffmem.zoo import corpus

    objects = [corpus.ZooObject(s, c, p) for c in corpus.COLORS for s in corpus.SHAPES for p in corpus.POSITIONS]
    out = [corpus.generic_caption(corpus.ZooObject(s, c, p, z), b) for z in corpus.SIZES for c in corpus.COLORS
           for s in corpus.SHAPES for p in corpus.POSITIONS for b in corpus.BACKGROUNDS]
    out += [corpus.scene_caption((a, b), bg) for a in objects for b in objects if a.position != b.position
            for bg in corpus.BACKGROUNDS]
    rng = random.Random(seed)
    backgrounds = list(corpus.BACKGROUNDS)
    while n_three > 0:
        trio = tuple(rng.sample(objects, 3))
        if len({o.position for o in trio}) == 3:
            out.append(corpus.scene_caption(trio, rng.choice(backgrounds)))
            n_three -= 1
    return out


def shared_list_captions(folder: Path | None = None) -> list[str]:
    """Captions of every prompt file in ``folder`` (default: :data:`PROMPT_LISTS`; one line each: inner
    whitespace collapsed); none without a folder."""
    from diffmem.prompts import load_prompts

    folder = folder or PROMPT_LISTS
    out: list[str] = []
    for path in sorted(folder.iterdir()) if folder is not None and folder.is_dir() else []:
        if path.suffix in (".txt", ".jsonl", ".csv", ".parquet"):
            out += [" ".join(t.split()) for t in load_prompts(path).texts]
    return out


def growth_prompts(n: int, seed: int = 0) -> list[str]:
    """The first ``n`` prompts of the deduplicated, seeded shuffle of the grammar and the prompt lists."""
    pool = list(dict.fromkeys(t for t in shared_list_captions() + zoo_grammar_captions() if t))
    random.Random(seed).shuffle(pool)
    if n > len(pool):
        raise SystemExit(f"only {len(pool)} unique prompts can be generated; asked for {n}")
    return pool[:n]


# ------------------------------------------------------------------------------------------- one run
def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _parts(out: Path) -> list[Path]:
    return sorted((out / "parts").glob("rank*.parquet")) if (out / "parts").is_dir() else []


def scan_command(prompts: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "diffmem.cli", "scan", "--prompts", str(prompts), "--detector", "noise-norm",
            "--draws", str(DRAWS), "--batch-size", str(BATCH), "--quiet", "--out", str(out)]


def run_cli(prompts: Path, out: Path, log: Path, threads: int, kill_at_parts: int | None = None,
            sample_every: float = 2.0) -> dict[str, Any]:
    """Run the scan command once; SIGKILL it when ``kill_at_parts`` parts exist (if given)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start, load_before = time.time(), os.getloadavg()[0]
    with log.open("w") as fh:
        child = subprocess.Popen(scan_command(prompts, out), stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    timeline: list[tuple[float, int, float]] = []
    killed = False
    last_sample = 0.0
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        now = time.time()
        if kill_at_parts is not None and len(_parts(out)) >= kill_at_parts and not killed:
            os.kill(child.pid, signal.SIGKILL)
            killed = True
        if now - last_sample >= sample_every:
            rss = _rss_mb(child.pid)
            if rss is not None:
                timeline.append((round(now - start, 1), len(_parts(out)), round(rss, 1)))
                with log.with_suffix(".rss.jsonl").open("a") as fh:  # readable while a long point runs
                    fh.write(json.dumps(timeline[-1]) + "\n")
            last_sample = now
        time.sleep(0.2)
    wall = time.time() - start
    text = log.read_text(errors="replace")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "returncode": os.waitstatus_to_exitcode(status), "killed": killed,
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "start_time": start,
            "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "terminal_lines": len(text.splitlines()), "terminal_tail": text.splitlines()[-3:],
            "truncation_lines": sum("truncated" in line for line in text.splitlines()), "rss_timeline": timeline}


def merge_again(prompts_file: Path, out: Path) -> dict[str, Any]:
    """Time ``merge_parts`` on the finished parts (into a scratch file) and check it equals scores.parquet."""
    import pyarrow.parquet as pq

    from diffmem.jobs import merge_parts
    from diffmem.prompts import load_prompts

    prompts = load_prompts(prompts_file)
    start = time.perf_counter()
    path = merge_parts(out, prompts, 1, BATCH, "merge_check.parquet")
    seconds = time.perf_counter() - start
    same = path is not None and pq.read_table(path).equals(pq.read_table(out / "scores.parquet"))
    if path is not None:
        path.unlink()
    return {"merge_s": round(seconds, 3), "merge_equals_scores": bool(same)}


def steady_per_prompt(out: Path, n: int) -> float | None:
    """Seconds per prompt between the first and the last part written (no imports, loading or merge)."""
    times = sorted(p.stat().st_mtime for p in _parts(out))
    if len(times) < 3:
        return None
    return (times[-1] - times[0]) / (n - BATCH) if n > BATCH else None


# ------------------------------------------------------------------------------------------- points
def prompt_file(work: Path, n: int) -> Path:
    path = work / f"prompts_{n}.txt"
    if not path.is_file():
        path.write_text("\n".join(growth_prompts(n)) + "\n", encoding="utf-8")
    return path


def point(work: Path, n: int, threads: int) -> dict[str, Any]:
    prompts = prompt_file(work, n)
    out = work / f"scan_{n}"
    resumed = out.exists() and not (out / "scores.parquet").is_file()
    done_before = len(_parts(out))
    run = run_cli(prompts, out, work / f"scan_{n}.log", threads)
    if run["returncode"] < 0:  # stopped by a signal (e.g. at a deadline): what it did until then, resumable
        times = sorted(p.stat().st_mtime for p in _parts(out))
        steady = round((times[-1] - times[0]) / (len(times) - 1), 2) if len(times) > 2 else None
        timeline = run["rss_timeline"][:: max(1, len(run["rss_timeline"]) // 60)]
        return {"prompts": n, "finished": False, "threads": threads, "signal": -run["returncode"],
                "wall_s": run["wall_s"], "cpu_s": run["cpu_s"], "parts_written": len(times),
                "parts_expected": -(-n // BATCH), "peak_rss_mb": run["peak_rss_mb"],
                "cpu_per_prompt_ms_so_far": round(1000 * run["cpu_s"] / max(1, len(times) * BATCH), 3),
                "steady_wall_s_per_part": steady, "load_avg_1min": run["load_avg_1min"], "rss_timeline": timeline,
                "resume_with": f"rerun the same command: {len(times)} parts are kept"}
    if run["returncode"] != 0:
        raise SystemExit(f"scan of {n} prompts failed (rc {run['returncode']}); see {work / f'scan_{n}.log'}")
    parts = _parts(out)
    truncated = json.loads((out / "provenance.json").read_text())["prompts"]["truncated"]["count"]
    record = {"prompts": n, "threads": threads, **{k: v for k, v in run.items() if k != "start_time"},
              "parts": len(parts),
              "per_prompt_ms": round(1000 * run["wall_s"] / n, 3),
              "cpu_per_prompt_ms": round(1000 * run["cpu_s"] / n, 3),
              "steady_per_prompt_ms": round(1000 * (steady_per_prompt(out, n) or float("nan")), 3),
              "interrupted": resumed, "parts_before_this_run": done_before,
              "provenance_truncated": truncated,
              **merge_again(prompts, out)}
    # keep the timeline short in the JSON: at most ~60 samples
    step = max(1, len(record["rss_timeline"]) // 60)
    record["rss_timeline"] = record["rss_timeline"][::step]
    return record


def resume_test(work: Path, n: int, threads: int) -> dict[str, Any]:
    """Kill at ~50% of the parts, rerun, count the parts written after the restart, compare the table exactly."""
    import pyarrow.parquet as pq

    prompts = prompt_file(work, n)
    reference = work / f"scan_{n}" / "scores.parquet"
    if not reference.is_file():
        raise SystemExit(f"run the uninterrupted {n}-prompt point first (--sizes {n})")
    out = work / f"resume_{n}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    expected = -(-n // BATCH)
    first = run_cli(prompts, out, work / f"resume_{n}_killed.log", threads, kill_at_parts=expected // 2)
    at_kill = len(_parts(out))
    leftovers = [p.name for p in (out / "parts").iterdir() if p.suffix == ".tmp"]
    second = run_cli(prompts, out, work / f"resume_{n}_rerun.log", threads)
    after = [p for p in _parts(out) if p.stat().st_mtime >= second["start_time"]]
    same = pq.read_table(out / "scores.parquet").equals(pq.read_table(reference))
    return {"prompts": n, "parts_expected": expected, "killed": first["killed"], "kill_returncode": first["returncode"],
            "parts_at_kill": at_kill, "temp_files_left_by_kill": len(leftovers),
            "parts_written_after_restart": len(after), "parts_missing_at_kill": expected - at_kill,
            "rework_parts": len(after) - (expected - at_kill),
            "wall_s_killed_run": first["wall_s"], "wall_s_rerun": second["wall_s"],
            "rerun_returncode": second["returncode"],
            "final_table_equals_uninterrupted": bool(same)}


def synthetic_jobs(work: Path, n: int) -> dict[str, Any]:
    """The job machinery alone at n prompts (a stub score, no model): its wall time and RSS change over the
    chunk loop (``run_chunks``) and the time of ``merge_parts``, to show neither grows faster than n."""
    import shutil

    import numpy as np
    import pyarrow.parquet as pq

    from diffmem.jobs import merge_parts, run_chunks
    from diffmem.prompts import PromptSet

    out = work / f"synthetic_{n}"
    shutil.rmtree(out, ignore_errors=True)
    prompts = PromptSet(ids=[str(i) for i in range(n)], texts=[f"prompt {i}" for i in range(n)], source="synthetic")
    rng = np.random.default_rng(0)
    rss_before = _rss_mb(os.getpid())
    start, cpu = time.perf_counter(), time.process_time()
    run_chunks(prompts, out, BATCH, lambda chunk: {"score": rng.standard_normal(len(chunk))}, progress=False)
    loop_s, loop_cpu = time.perf_counter() - start, time.process_time() - cpu
    rss_after_loop = _rss_mb(os.getpid())
    merge_s = merge_cpu = float("inf")
    for _ in range(2):  # best of two: the first read may wait on the disk, the machine is shared
        start, cpu = time.perf_counter(), time.process_time()
        merged = merge_parts(out, prompts, 1, BATCH, "scores.parquet")
        merge_s, merge_cpu = min(merge_s, time.perf_counter() - start), min(merge_cpu, time.process_time() - cpu)
    rows = pq.read_metadata(merged).num_rows
    shutil.rmtree(out)
    parts = -(-n // BATCH)
    return {"prompts": n, "parts": parts, "chunk_loop_s": round(loop_s, 2), "chunk_loop_cpu_s": round(loop_cpu, 2),
            "chunk_loop_cpu_ms_per_part": round(1000 * loop_cpu / parts, 3), "merge_s": round(merge_s, 3),
            "merge_cpu_s": round(merge_cpu, 3), "merge_cpu_us_per_prompt": round(1e6 * merge_cpu / n, 3),
            "merged_rows": rows,
            "rss_mb_before": round(rss_before or 0, 1), "rss_mb_after_loop": round(rss_after_loop or 0, 1)}


def tokenizer_rate(n: int) -> dict[str, Any]:
    """Prompts per CPU second and per wall second of the truncation record (``token_counts`` of the zoo
    model's CLIP tokenizer). Scans no longer pay it up front: each process counts its own chunks' tokens."""
    from diffmem.models import load_model

    model, texts = load_model("zoo:collapse"), growth_prompts(n)
    start, cpu = time.perf_counter(), time.process_time()
    counts = model.token_counts(texts)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"prompts": n, "tokenizer": type(model.tokenizer).__name__, "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2), "prompts_per_cpu_second": round(n / cpu),
            "prompts_per_wall_second": round(n / wall),
            "truncated": sum(c > model.max_tokens for c in counts), "load_avg_1min": round(os.getloadavg()[0], 2)}


# ------------------------------------------------------------------------------------------- output
def plot(record: dict[str, Any], path: Path) -> None:
    """Left: seconds against prompts (the command's wall and CPU time; the job loop and merge alone).
    Right: the command's RSS against the prompts it has scored, and its peak (hollow: a stopped run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(record.get("points", {}).values(), key=lambda p: p["prompts"])
    stopped = sorted(record.get("unfinished", {}).values(), key=lambda p: p["prompts"])
    synthetic = sorted(record.get("synthetic_jobs", {}).values(), key=lambda p: p["prompts"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    if pts:
        n = [p["prompts"] for p in pts]
        ax1.loglog(n, [p["wall_s"] for p in pts], "o-", label="scan command: wall")
        if all("cpu_s" in p for p in pts):
            ax1.loglog(n, [p["cpu_s"] for p in pts], "s-", label="scan command: CPU")
    for p in stopped:
        done = p["parts_written"] * record["batch_size"]
        ax1.loglog([done], [p["cpu_s"]], "s", mfc="none", color="C1", label=f"stopped {p['prompts']} run: CPU so far")
    if synthetic:
        m = [p["prompts"] for p in synthetic]
        ax1.loglog(m, [p["chunk_loop_cpu_s"] for p in synthetic], "^--", label="job loop alone (stub scores): CPU")
        ax1.loglog(m, [p["merge_cpu_s"] for p in synthetic], "v--", label="merge_parts alone: CPU")
    ax1.set_xlabel("prompts")
    ax1.set_ylabel("seconds")
    ax1.legend(fontsize=7)
    for i, p in enumerate(pts):  # RSS while the scan runs, against the prompts scored so far (parts x batch)
        timeline = [(min(parts * record["batch_size"], p["prompts"]), rss) for _, parts, rss in p["rss_timeline"]
                    if parts > 0]
        if timeline:
            ax2.plot(*zip(*timeline), ".-", color=f"C{i}", label=f"{p['prompts']:,}-prompt scan: RSS while running")
        ax2.plot([p["prompts"]], [p["peak_rss_mb"]], "*", ms=10, color=f"C{i}", label=f"{p['prompts']:,}: peak RSS")
    for p in stopped:
        ax2.plot([p["parts_written"] * record["batch_size"]], [p["peak_rss_mb"]], "o", mfc="none", color="C1",
                 label=f"{p['prompts']}-prompt scan, stopped")
    peaks = [p["peak_rss_mb"] for p in pts + stopped] or [1.0]
    ax2.set_ylim(0, max(peaks) * 1.3)
    ax2.set_xlabel("prompts scored")
    ax2.set_ylabel("RSS of the command (MB)")
    ax2.legend(fontsize=7)
    fig.suptitle(f"diffmem scan, noise-norm at {record['draws']} draws, zoo model, CPU "
                 f"({record['threads']} threads, 2 cores shared by 5 jobs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--synthetic", type=int, nargs="*", default=[],
                        help="also time the job loop and merge alone (stub scores) at these sizes")
    parser.add_argument("--tokenizer-rate", type=int, default=0, help="time the truncation record on N prompts")
    parser.add_argument("--resume-test", type=int, default=None, help="prompts of the kill/rerun test (e.g. 10000)")
    parser.add_argument("--threads", type=int, default=2, help="OMP threads of the scan command (default: 2)")
    parser.add_argument("--work", default="runs/scan_growth", help="scratch folder (prompt files, scans, logs)")
    parser.add_argument("--out", default="benchmarks/results/scan_growth.json")
    parser.add_argument("--plot", action="store_true", help="only redraw the figure from --out")
    parser.add_argument("--prompt-lists", type=Path, default=None,
                        help="folder of prompt lists added to the zoo grammar (default: $DIFFMEM_PROMPT_LISTS)")
    args = parser.parse_args()
    global PROMPT_LISTS
    PROMPT_LISTS = args.prompt_lists or PROMPT_LISTS
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.is_file() else {
        "benchmark": "scan_growth", "command": " ".join(scan_command(Path("PROMPTS"), Path("OUT"))[1:]),
        "draws": DRAWS, "batch_size": BATCH, "threads": args.threads, "cpus": os.cpu_count(), "points": {}}
    from diffmem.io import atomic_write_text
    from diffmem.provenance import portable_json

    mine: dict[str, Any] = {}

    def save() -> None:  # re-read first: a second invocation (e.g. the long 100k point) may share the file
        merged = json.loads(out.read_text()) if out.is_file() else record
        merged["points"].update(mine.get("points", {}))
        merged.update({k: v for k, v in mine.items() if k != "points"})
        record.update(merged)
        atomic_write_text(out, portable_json(merged))

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not args.plot:
        for n in args.sizes:
            if str(n) in record["points"]:
                print(f"{n}: done ({record['points'][str(n)]['wall_s']} s); skipped")
                continue
            result = point(work, n, args.threads)
            if not result.get("finished", True):
                mine.setdefault("unfinished", dict(record.get("unfinished", {})))[str(n)] = result
                save()
                print(f"{n}: stopped after {result['parts_written']} of {result['parts_expected']} parts", flush=True)
                continue
            mine.setdefault("points", {})[str(n)] = result
            save()
            p = record["points"][str(n)]
            print(f"{n}: {p['wall_s']} s, {p['per_prompt_ms']} ms/prompt, peak RSS {p['peak_rss_mb']} MB, "
                  f"{p['parts']} parts, merge {p['merge_s']} s", flush=True)
        for n in args.synthetic:
            mine.setdefault("synthetic_jobs", dict(record.get("synthetic_jobs", {})))[str(n)] = synthetic_jobs(work, n)
            save()
            print(json.dumps(mine["synthetic_jobs"][str(n)]), flush=True)
        if args.tokenizer_rate:
            mine["tokenizer_rate"] = tokenizer_rate(args.tokenizer_rate)
            save()
            print(json.dumps(mine["tokenizer_rate"]), flush=True)
        if args.resume_test:
            mine["resume"] = resume_test(work, args.resume_test, args.threads)
            save()
            print(json.dumps(record["resume"], indent=2))
    if record["points"]:
        plot(record, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
