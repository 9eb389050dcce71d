"""Nothing lost: no command deletes or overwrites a file it did not write, nor any input (issue #15)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from diffmem.cli.main import main
from diffmem.outputs import (
    MARKER,
    OutputError,
    check_not_input,
    check_output_dir,
    check_output_file,
    claim_output_dir,
    publish,
    staging_dir,
)

MEM = ["a red circle in the top left and a blue cross in the center on a gray background", "a photo of a cat"]
ORD = ["a small green square in the center on a white background", "a dog", "a house", "a tree by a lake"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def prompt_files(tmp_path):
    mem, ref = tmp_path / "mem.txt", tmp_path / "ord.txt"
    mem.write_text("\n".join(MEM), encoding="utf-8")
    ref.write_text("\n".join(ORD), encoding="utf-8")
    return mem, ref


@pytest.fixture()
def model_copy(tmp_path, tiny_sd_folder):
    """A private copy of the tiny model inside ``tmp_path/models`` (tests may try to damage it)."""
    import shutil

    dst = tmp_path / "models" / "pipe"
    shutil.copytree(tiny_sd_folder, dst)
    return dst


def _mitigate(model: Path, prompts: tuple[Path, Path], out: Path, *extra: str) -> int:
    mem, ref = prompts
    return main(["mitigate", "subspace-pruning", "--model", str(model), "--prompts", str(mem), "--reference", str(ref),
                 "--option", "timesteps=2", "--option", "fraction=0.05", "--out", str(out), *extra])


# ---------------------------------------------------------------- data loss: mitigate (the reported cases)
def test_mitigate_refuses_an_existing_folder_and_keeps_its_files(model_copy, prompt_files, tmp_path, capsys):
    out = tmp_path / "sandbox" / "mydata"
    out.mkdir(parents=True)
    (out / "important.txt").write_text("keep me")
    assert _mitigate(model_copy, prompt_files, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffmem: error: --out") and "files diffmem did not write" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["important.txt"]
    assert (out / "important.txt").read_text() == "keep me"
    assert not list(out.parent.glob(".mydata.*"))  # no staging folder left behind


def test_mitigate_force_adds_the_checkpoint_and_keeps_the_users_file(model_copy, prompt_files, tmp_path):
    out = tmp_path / "mydata"
    out.mkdir()
    (out / "important.txt").write_text("keep me")
    assert _mitigate(model_copy, prompt_files, out, "--force") == 0
    assert (out / "important.txt").read_text() == "keep me"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    marker = json.loads((out / MARKER).read_text())
    assert marker["command"] == "mitigate subspace-pruning"  # command and method: not another method's folder
    assert "important.txt" not in marker["files"] and "unet" in marker["files"]
    # a rerun into our own output is accepted without --force and replaces only our files
    assert _mitigate(model_copy, prompt_files, out) == 0
    assert (out / "important.txt").read_text() == "keep me"


def test_mitigate_force_refuses_to_replace_a_users_file_of_the_same_name(model_copy, prompt_files, tmp_path, capsys):
    out = tmp_path / "mydata"
    out.mkdir()
    (out / "mitigation.json").write_text("my own notes")
    assert _mitigate(model_copy, prompt_files, out, "--force") == 2
    assert "mitigation.json" in capsys.readouterr().err
    assert (out / "mitigation.json").read_text() == "my own notes"


def test_mitigate_refuses_out_equal_to_inside_or_containing_the_input(model_copy, prompt_files, capsys):
    before = _snapshot(model_copy.parent)
    for out, word in [(model_copy, "is the input"), (model_copy / "patched", "inside the input"),
                      (model_copy.parent, "contains the input")]:
        assert _mitigate(model_copy, prompt_files, out) == 2
        err = capsys.readouterr().err
        assert word in err and err.count("\n") == 1
    assert _snapshot(model_copy.parent) == before  # the input checkpoint is untouched
    assert not (model_copy / "patched").exists()


def test_inference_mitigation_save_is_safe_too(model_copy, tmp_path):
    from diffmem.mitigators import make_mitigator
    from diffmem.models import load_model

    model = load_model(model_copy)
    out = tmp_path / "noise"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="files diffmem did not write"):
        make_mitigator("embedding-noise").save(out, model)
    path = make_mitigator("embedding-noise").save(out, model, force=True)
    assert path == out / "mitigation.json" and (out / "notes.txt").read_text() == "mine"
    with pytest.raises(OutputError, match="inside the input"):
        make_mitigator("embedding-noise").save(model_copy / "x", model)


def test_patched_checkpoint_keeps_the_input_dtype_and_is_group_readable(tmp_path, clip_tokenizer, prompt_files):
    from conftest import make_tiny_sd
    from safetensors import safe_open

    fp16 = tmp_path / "fp16"
    make_tiny_sd(clip_tokenizer).to(torch.float16).save_pretrained(fp16, safe_serialization=True)
    old = os.umask(0o077)  # a strict umask must not make the outputs private
    try:
        assert _mitigate(fp16, prompt_files, tmp_path / "patched") == 0
    finally:
        os.umask(old)
    weights = tmp_path / "patched" / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), framework="pt") as fh:
        dtypes = {fh.get_slice(k).get_dtype() for k in fh.keys()}  # noqa: SIM118 - not a dict
    assert dtypes == {"F16"}
    assert weights.stat().st_size < 1.2 * (fp16 / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert _mode(weights) == 0o644 and _mode(tmp_path / "patched") == 0o755
    assert _mode(tmp_path / "patched" / "mitigation.json") == 0o644


# ---------------------------------------------------------------- every other command that writes a folder
@pytest.mark.parametrize("argv", [
    ["scan", "--prompts", "{prompts}"],
    ["calibrate", "--prompts", "{prompts}"],
    ["extract", "--prompts", "{prompts}"],
    ["bench"],
    ["demo"],
    ["deepssim", "train"],
    ["zoo", "build"],
    ["eval", "detect", "--scores", "{scores}", "--labels", "{prompts}"],
])
def test_every_command_refuses_a_folder_holding_other_files(argv, tmp_path, prompt_files, tiny_sd_folder, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "important.txt").write_text("keep me")
    scores = tmp_path / "scores.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["0"], "text": [MEM[0]], "noise-norm": [1.0]}), scores)
    argv = [a.format(prompts=prompt_files[0], scores=scores) for a in argv]
    model = ["--model", str(tiny_sd_folder)] if argv[0] in ("scan", "calibrate", "extract", "bench", "demo") else []
    assert main([*argv, *model, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffmem: error: --out") and "did not write" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["important.txt"]


def test_scan_refuses_out_inside_the_model_and_writes_nothing(tiny_sd_folder, prompt_files, capsys):
    before = _snapshot(tiny_sd_folder)
    assert main(["scan", "--model", str(tiny_sd_folder), "--prompts", str(prompt_files[0]),
                 "--out", str(tiny_sd_folder / "scan")]) == 2
    assert "inside the input" in capsys.readouterr().err
    assert _snapshot(tiny_sd_folder) == before and not (tiny_sd_folder / "scan").exists()


def test_scan_resumes_its_own_folder_and_marks_it(tiny_sd_folder, prompt_files, tmp_path):
    out = tmp_path / "scan"
    argv = ["scan", "--model", str(tiny_sd_folder), "--prompts", str(prompt_files[1]), "--draws", "1",
            "--detector", "noise-norm", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert json.loads((out / MARKER).read_text())["command"] == "scan"
    assert main(argv) == 0  # same command, same settings: accepted (resumed / nothing to do)
    assert _mode(out / "scores.parquet") == 0o644


@pytest.fixture()
def report_run(tmp_path):
    """A run folder holding one benchmark JSON, and a user's HTML file beside it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "bench.json").write_text(json.dumps({"results": {}}))
    mine = tmp_path / "notes.html"
    mine.write_text("<html>my notes</html>")
    return run, mine


def test_report_refuses_to_replace_a_file_it_did_not_write(report_run, tmp_path, capsys):
    run, mine = report_run
    assert main(["report", str(run), "--out", str(mine)]) == 2
    assert "diffmem did not write" in capsys.readouterr().err and mine.read_text() == "<html>my notes</html>"
    assert main(["report", str(run), "--out", str(run / "bench.json")]) == 2  # an input file
    assert (run / "bench.json").read_text() == json.dumps({"results": {}})
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0  # our own report: replaced
    assert _mode(tmp_path / "r.html") == 0o644


# ---------------------------------------------------------------- the library rules
def test_check_not_input_cases(tmp_path):
    model = tmp_path / "a" / "model"
    check_not_input(tmp_path / "a" / "other", [model, None])
    for out, word in [(model, "is the input"), (model / "x", "inside the input"), (tmp_path / "a", "contains")]:
        with pytest.raises(OutputError, match=word):
            check_not_input(out, [model])


def test_check_output_dir_states(tmp_path):
    out = tmp_path / "o"
    assert check_output_dir(out, "scan") == "new"
    out.mkdir()
    assert check_output_dir(out, "scan") == "new"  # empty
    claim_output_dir(out, "scan", ["scores.parquet"])
    (out / "scores.parquet").write_bytes(b"x")
    assert check_output_dir(out, "scan") == "ours"
    with pytest.raises(OutputError, match=r"an output of `diffmem scan`"):
        check_output_dir(out, "extract")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="is an existing file; expected a folder"):
        check_output_dir(f, "scan")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_dir(f / "sub", "scan")


def test_unwritable_location_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root ignores chmod; simulate a read-only fs
    with pytest.raises(OutputError, match="is not writable"):
        check_output_dir(tmp_path / "o", "scan")
    with pytest.raises(OutputError, match="is not writable"):
        check_output_file(tmp_path / "r.html")


def test_publish_swaps_in_only_our_names(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "user.txt").write_text("u")
    stage = staging_dir(out)
    (stage / "result.json").write_text("1")
    publish(stage, out, "mitigate")
    assert (out / "user.txt").read_text() == "u" and (out / "result.json").read_text() == "1"
    stage = staging_dir(out)
    (stage / "result.json").write_text("2")
    publish(stage, out, "mitigate")
    assert (out / "result.json").read_text() == "2" and (out / "user.txt").read_text() == "u"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no staging or trash folder left
    stage = staging_dir(out)
    (stage / "user.txt").write_text("clobber")
    with pytest.raises(OutputError, match="user.txt"):
        publish(stage, out, "mitigate")
    assert (out / "user.txt").read_text() == "u"


# ---------------------------------------------------------------- issue #32: outputs that are someone else's
def _refused(capsys, *words: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("diffmem: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)


def test_zoo_build_refuses_a_work_dir_in_a_model_or_holding_a_users_files(model_copy, tmp_path, capsys):
    """A copy of a model folder got 200 MB and tokenizer files (its fingerprint changed); a user's folder got its
    stage_seconds.json rewritten. Both are refused before anything is trained or written."""
    before = _snapshot(model_copy)
    out = tmp_path / "zoo"
    for work, words in [(model_copy, ["is the model folder", str(model_copy)]),
                        (model_copy / "work", ["is inside the model folder"])]:
        assert main(["zoo", "build", "--out", str(out), "--work-dir", str(work), "--no-label"]) == 2
        _refused(capsys, "--work-dir", *words)
    assert _snapshot(model_copy) == before and not (model_copy / "work").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "stage_seconds.json").write_text('{"my": 1}')
    assert main(["zoo", "build", "--out", str(out), "--work-dir", str(mine), "--no-label"]) == 2
    _refused(capsys, "--work-dir", "files diffmem did not write")
    assert _snapshot(mine) == {"stage_seconds.json": b'{"my": 1}'} and not out.exists()


def test_zoo_build_accepts_its_own_work_dirs(tmp_path):
    from diffmem.zoo.build import WORK_COMMAND, ZooConfig, check_work_dir

    out = tmp_path / "zoo"
    check_work_dir(tmp_path / "new", out)  # new
    ours = tmp_path / "ours"
    claim_output_dir(ours, WORK_COMMAND, ["vae.pt"])
    (ours / "vae.pt").write_bytes(b"x")
    check_work_dir(ours, out)  # marked as a work folder
    earlier = tmp_path / "earlier"  # from before ownership markers: its zoo_config.json says what it is
    earlier.mkdir()
    (earlier / "zoo_config.json").write_text(json.dumps(ZooConfig().to_dict()))
    (earlier / "stage_seconds.json").write_text("{}")
    check_work_dir(earlier, out)
    claim_output_dir(tmp_path / "scan", "scan", ["scores.parquet"])
    with pytest.raises(OutputError, match="an output of `diffmem scan`"):
        check_work_dir(tmp_path / "scan", out)
    with pytest.raises(OutputError, match="is the input"):
        check_work_dir(out, out)


def test_check_corpus_out_is_checked_before_the_work(tmp_path, monkeypatch, capsys):
    """`zoo check-corpus --out FILE` overwrote a user's file with JSON; `--out FOLDER` crashed after 36 s of work."""
    import diffmem.zoo.gate as gate

    def no_work(*a, **k):
        raise AssertionError("--out must be refused before the corpus is built")

    monkeypatch.setattr(gate, "corpus_view", no_work)
    mine = tmp_path / "notes.json"
    mine.write_text("my notes")
    assert main(["zoo", "check-corpus", "--out", str(mine)]) == 2
    _refused(capsys, f"--out '{mine}' is an existing file diffmem did not write")
    assert mine.read_text() == "my notes"
    assert main(["zoo", "check-corpus", "--out", str(tmp_path)]) == 2
    _refused(capsys, "is a folder; expected a file path")
    report = {"corpus": "sd", "n": 1}
    monkeypatch.setattr(gate, "corpus_view", lambda name: name)
    monkeypatch.setattr(gate, "load_zoo_vae", lambda path: None)
    monkeypatch.setattr(gate, "check_corpus", lambda view, vae: report)
    monkeypatch.setattr(gate, "format_report", lambda r: "gate report")
    out = tmp_path / "gate.json"
    assert main(["zoo", "check-corpus", "--out", str(out)]) == 0
    assert main(["zoo", "check-corpus", "--out", str(out)]) == 0  # our own report: replaced
    assert json.loads(out.read_text()) == {"benchmark": "zoo-check-corpus", **report}


@pytest.fixture()
def small_zoo(tmp_path):
    """A folder that looks like a zoo to `zoo label` (its labelling is replaced in the tests)."""
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "zoo.json").write_text(json.dumps({"parameters": 1, "labels": {"old": True}}))
    (zoo / "labels.jsonl").write_text('{"caption": "a", "memorized": true}\n')
    return zoo


def test_zoo_label_writes_a_new_folder_and_never_the_zoo(small_zoo, tmp_path, monkeypatch, capsys):
    """`zoo label` rewrote labels.jsonl and zoo.json in place; without --zoo, those of the installed package."""
    import diffmem.cli.zoo_commands as zc

    summary = {"by_kind": {}, "signature_by_replication": {}, "generic_fidelity": {}}
    monkeypatch.setattr(zc, "label_folder", lambda folder, *a, **k: ([{"caption": "a", "memorized": False}], summary))
    before = _snapshot(small_zoo)
    out = tmp_path / "relabel"
    assert main(["zoo", "label", "--zoo", str(small_zoo), "--out", str(out)]) == 0
    assert _snapshot(small_zoo) == before
    assert json.loads((out / "labels.jsonl").read_text()) == {"caption": "a", "memorized": False}
    assert json.loads((out / "zoo.json").read_text()) == {"parameters": 1, "labels": summary}
    assert json.loads((out / MARKER).read_text())["command"] == "zoo-label"
    for bad, words in [(small_zoo, ["is the input"]), (small_zoo / "new", ["inside the input"])]:
        assert main(["zoo", "label", "--zoo", str(small_zoo), "--out", str(bad)]) == 2
        _refused(capsys, *words)
    assert _snapshot(small_zoo) == before


def test_no_command_writes_into_the_installed_package(tmp_path, capsys, prompt_files, tiny_sd_folder):
    from diffmem.outputs import PACKAGE_DIR
    from diffmem.zoo.paths import SHIPPED_SD

    for target in (SHIPPED_SD, SHIPPED_SD / "relabel", PACKAGE_DIR / "runs"):
        with pytest.raises(OutputError, match="inside the installed diffmem package"):
            check_output_dir(target, "zoo-label")
    with pytest.raises(OutputError, match="inside the installed diffmem package"):
        check_output_file(PACKAGE_DIR / "report.html")
    before = _snapshot(SHIPPED_SD / "pipeline" / "scheduler")
    assert main(["zoo", "label", "--zoo", str(SHIPPED_SD), "--out", str(SHIPPED_SD / "relabel")]) == 2
    _refused(capsys, "inside the installed diffmem package")
    assert main(["scan", "--model", str(tiny_sd_folder), "--prompts", str(prompt_files[0]),
                 "--out", str(PACKAGE_DIR / "scan")]) == 2
    _refused(capsys, "inside the installed diffmem package")
    assert not (SHIPPED_SD / "relabel").exists() and not (PACKAGE_DIR / "scan").exists()
    assert _snapshot(SHIPPED_SD / "pipeline" / "scheduler") == before


def test_report_force_never_replaces_a_users_file_nor_writes_into_a_run(report_run, capsys):
    run, mine = report_run
    assert main(["report", str(run), "--out", str(mine), "--force"]) == 2
    _refused(capsys, "diffmem did not write", "not even with --force")
    assert mine.read_text() == "<html>my notes</html>"
    assert main(["report", str(run), "--out", str(run / "report.html")]) == 2
    _refused(capsys, "is inside the input")
    assert sorted(p.name for p in run.iterdir()) == ["bench.json"]


def test_an_output_of_one_method_is_not_ours_for_another(model_copy, prompt_files, tmp_path, capsys):
    """`mitigate embedding-noise --out` a fine-tuned checkpoint's folder replaced its mitigation.json, leaving
    fine-tuned weights labelled as an inference-time config."""
    out = tmp_path / "patched"
    assert _mitigate(model_copy, prompt_files, out, "--quiet") == 0
    before = _snapshot(out)
    mem, ref = prompt_files
    for extra in ([], ["--force"]):
        assert main(["mitigate", "embedding-noise", "--model", str(model_copy), "--prompts", str(mem), "--reference",
                     str(ref), "--out", str(out), *extra]) == 2
        _refused(capsys, "an output of `diffmem mitigate subspace-pruning`, not of `diffmem mitigate embedding-noise`")
    assert _snapshot(out) == before
    with pytest.raises(OutputError, match="not of `diffmem scan`"):
        check_output_dir(out, "scan", force=True)


def test_staged_folder_is_removed_on_an_exception(tmp_path):
    from diffmem.outputs import staged

    out = tmp_path / "zoo"
    with pytest.raises(RuntimeError, match="injected"), staged(out, "zoo-build") as staging:
        (staging / "pipeline").mkdir()
        raise RuntimeError("injected")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_zoo_build_leaves_no_staging_folder(tmp_path):
    """A SIGTERM late in `zoo build` left hidden `.NAME.*.partial` folders behind: the CLI turns SIGTERM into an
    exception, so the staging folder is removed and the exit status is 143."""
    import signal
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys, time
        import diffmem.zoo.build as build
        from diffmem.cli.main import main
        from diffmem.outputs import staged

        def build_zoo(out, cfg, work_dir):  # the build's last stage: saving into a staging folder
            with staged(out, "zoo-build") as staging:
                (staging / "pipeline").mkdir()
                print("staged", flush=True)
                time.sleep(60)

        build.build_zoo = build_zoo
        sys.exit(main(["zoo", "build", "--out", sys.argv[1], "--no-label"]))
    """)
    out = tmp_path / "zoo"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "staged"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
