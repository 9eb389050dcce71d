"""Benchmark tasks, model-derived surrogates and `diffmem bench` / `mitigate adversarial-finetune` on a
non-zoo checkpoint (a tiny random-weight Stable Diffusion folder)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.attacks.base import TrainingIndex
from diffmem.bench import choose, grid, summarise
from diffmem.cli.main import main
from diffmem.eval.matching import make_matcher
from diffmem.mitigators.surrogates import make_surrogates
from diffmem.models import load_model
from diffmem.tasks import MemorizedPrompt, SplitSizes, make_task
from diffmem.tasks.base import label_matches, split_by_seed

MEM = [f"a photo of memorized thing number {i}" for i in range(8)]
ORD = [f"an ordinary picture of object {i}" for i in range(12)]
TINY_ADV = ["--option", "adversarial-finetune-lora.rounds=1", "--option", "adversarial-finetune-lora.outer_steps=2",
            "--option", "adversarial-finetune-lora.inner_steps=2", "--option", "adversarial-finetune-lora.batch=2",
            "--option", "adversarial-finetune-lora.inner_batch=2",
            "--option", "adversarial-finetune-lora.retain_prompts=4",
            "--option", "adversarial-finetune-lora.lora_rank=2",
            "--option", "adversarial-finetune-lora.surrogate_candidates=2",
            "--option", "adversarial-finetune-lora.sample_steps=3"]


@pytest.fixture(scope="module")
def model(tiny_sd_folder):
    return load_model(tiny_sd_folder)


@pytest.fixture
def prompt_files(tmp_path):
    mem, ordi, images = tmp_path / "memorized.txt", tmp_path / "ordinary.txt", tmp_path / "train"
    mem.write_text("\n".join(MEM), encoding="utf-8")
    ordi.write_text("\n".join(ORD), encoding="utf-8")
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    return mem, ordi, images


def test_split_by_seed_is_disjoint_sized_and_seeded():
    mem = [MemorizedPrompt(f"m{i}", i) for i in range(20)]
    ordi = [f"o{i}" for i in range(30)]
    sizes = SplitSizes(fit=8, dev=4, test=6, ordinary_fit=10, ordinary_dev=5, ordinary_test=7)
    s0, s0b, s1 = split_by_seed(mem, ordi, 0, sizes), split_by_seed(mem, ordi, 0, sizes), split_by_seed(mem, ordi, 1,
                                                                                                       sizes)
    assert s0.describe() == {"seed": 0, "fit": 8, "dev": 4, "test": 6, "ordinary_fit": 10, "ordinary_dev": 5,
                             "ordinary_test": 7}
    assert not {p.caption for p in s0.fit} & {p.caption for p in s0.test}
    assert not {p.caption for p in s0.dev} & ({p.caption for p in s0.test} | {p.caption for p in s0.fit})
    assert not set(s0.ordinary_fit) & set(s0.ordinary_test) and not set(s0.ordinary_dev) & set(s0.ordinary_test)
    assert s0.test == s0b.test and s0.test != s1.test
    small = split_by_seed(mem[:5], ordi[:3], 0, sizes)  # a small task fills fit, then test, then dev
    assert (len(small.fit), len(small.test), len(small.dev)) == (2, 3, 0)


def test_label_matches_splits_own_and_other_items():
    train = torch.zeros(3, 3, 8, 8)
    train[1] += 0.5
    train[2] += 1.0
    index = TrainingIndex(train, np.array([10, 11, 12]), make_matcher("l2").fit(train), -0.01)
    queries = torch.stack([train[0], train[1], torch.full((3, 8, 8), 0.25)])
    labels = label_matches(index, queries, [10, 99, 12])
    assert labels.hit.tolist() == [True, True, False] and labels.own.tolist() == [True, False, False]
    assert labels.rates() == pytest.approx({"extraction_rate": 2 / 3, "matching_verbatim": 1 / 3,
                                            "template_verbatim": 1 / 3})


def test_choose_prefers_settings_meeting_both_targets_then_fidelity():
    dev = [{"extraction_rate": 0.0, "retrigger_extraction_rate": 0.2, "fidelity": 0.99},
           {"extraction_rate": 0.05, "retrigger_extraction_rate": 0.1, "fidelity": 0.80},
           {"extraction_rate": 0.0, "retrigger_extraction_rate": 0.0, "fidelity": 0.85}]
    assert choose(dev) == 2
    assert choose(dev[:1] + [{"extraction_rate": 0.3, "retrigger_extraction_rate": 0.0, "fidelity": 1.0}]) == 0
    # current files: DoRI's figure decides, the tuned re-trigger's is a second row
    both = [{"extraction_rate": 0.0, "dori_extraction_rate": 0.5, "tuned_retrigger_extraction_rate": 0.0,
             "fidelity": 0.99},
            {"extraction_rate": 0.0, "dori_extraction_rate": 0.05, "tuned_retrigger_extraction_rate": 0.5,
             "fidelity": 0.9}]
    assert choose(both) == 1
    assert grid({"b": [1, 2], "a": ["x"]}) == [{"a": "x", "b": 1}, {"a": "x", "b": 2}] and grid({}) == [{}]


def test_summarise_gives_mean_and_spread_over_seeds():
    runs = {"0": {"none": {"extraction_rate": 0.5, "fidelity": None, "acts_at": "-"}},
            "1": {"none": {"extraction_rate": 0.7, "fidelity": None, "acts_at": "-"}}}
    row = summarise(runs)["none"]
    assert row["seeds"] == 2 and row["extraction_rate"] == pytest.approx(0.6)
    assert row["extraction_rate_std"] == pytest.approx(0.1)


def test_zoo_scene_fidelity_reads_colours_at_named_positions():
    from diffmem.tasks.zoo import parse_scene_caption, scene_fidelity
    from diffmem.zoo.corpus import render
    from diffmem.zoo.load import load_corpus
    from diffmem.zoo.paths import zoo_dir

    items = [it for it in load_corpus(zoo_dir("collapse")) if it.kind == "signature"][:24]
    images = torch.from_numpy(np.stack([render(it.spec, it.image_seeds[0]) for it in items])).permute(0, 3, 1, 2) / 255
    captions = [it.caption for it in items]
    assert parse_scene_caption(captions[0])[1] in ("white", "black", "gray", "brown")
    assert scene_fidelity(images, captions).all()  # every training render draws its caption
    shifted = captions[1:] + captions[:1]  # each image judged against another scene's caption
    assert scene_fidelity(images, shifted).mean() <= 0.1


def test_zoo_statistics_prompts_are_never_trained_captions_of_the_memorized_families():
    """NeMo's statistics on the SD-like zoo: the held-out painting and poster titles not labelled memorized (150 +
    150 held-out signatures, 4 of them replicating by the verdict labels; the 12 held-out templates all replicate),
    none in a split."""
    from diffmem.zoo.load import load_labels

    task = make_task("zoo-sd")
    split = task.splits(0, SplitSizes(fit=32, dev=8, test=24))
    got = task.statistics_prompts(split)
    rows = {r["caption"]: r for r in load_labels(task.folder())}
    assert len(got) == 296 and len(set(got)) == 296
    assert {rows[c]["kind"] for c in got} == {"heldout_signature"} and not any(rows[c]["memorized"] for c in got)
    assert {rows[c]["family"] for c in got} == {"painting", "poster"}
    taken = {p.caption for p in split.fit + split.dev + split.test}
    taken |= set(split.ordinary_fit + split.ordinary_dev + split.ordinary_test)
    assert not taken & set(got)


def test_bench_passes_statistics_prompts_to_a_method_that_takes_them(monkeypatch, prompt_files):
    """fit_method hands the task's statistics prompts to a fit that accepts them: a folder task's ordinary fit
    split (all it knows), the zoo's held-out captions of the memorized families."""
    from dataclasses import dataclass

    import diffmem.bench as bench
    from diffmem.mitigators.base import InferenceMitigator

    @dataclass
    class Recorder(InferenceMitigator):
        name = "recorder"

        def fit(self, model, memorized, ordinary, statistics_prompts=None):
            self.got = (list(memorized), list(ordinary), statistics_prompts)

        def apply(self, model):
            return model

    monkeypatch.setattr(bench, "make_mitigator", lambda name, **options: Recorder())
    mem, ordi, _ = prompt_files
    folder = make_task("folder", memorized=str(mem), ordinary=str(ordi))
    split = folder.splits(0, SplitSizes(fit=3, dev=2, test=3, ordinary_fit=4, ordinary_dev=2, ordinary_test=3))
    _, fitted, changed, _ = bench.fit_method("recorder", {}, object(), folder, split, bench.BenchSettings())
    assert fitted.got == ([p.caption for p in split.fit], split.ordinary_fit, split.ordinary_fit) and changed == 0
    zoo = make_task("zoo-sd")
    zsplit = zoo.splits(1, SplitSizes(fit=4, dev=2, test=2, ordinary_fit=4, ordinary_dev=2, ordinary_test=2))
    _, fitted, _, _ = bench.fit_method("recorder", {}, object(), zoo, zsplit, bench.BenchSettings())
    assert fitted.got[2] == zoo.statistics_prompts(zsplit) and len(fitted.got[2]) > 100


def test_model_surrogates_keep_only_non_copies(model):
    mem = MEM[:3]
    # a training index holding exactly what the suppressed model draws: every candidate is a copy
    from diffmem.mitigators.surrogates import suppressed_model

    copies = torch.cat([suppressed_model(model, "random-tokens", {"seed": j}, mem, ORD).sample(
        mem, [j] * 3, num_inference_steps=4).images for j in range(2)])
    index = TrainingIndex(copies, np.arange(len(copies)), make_matcher("ssim").fit(copies), 0.99)
    rejected = make_surrogates(model, mem, ORD, candidates=2, steps=4, index=index)
    assert rejected.kept == [] and rejected.describe()["rejected"] == 3 and rejected.rule == "training-index"
    far = torch.zeros(2, 3, 16, 16)
    kept = make_surrogates(model, mem, ORD, candidates=2, steps=4,
                           index=TrainingIndex(far, np.arange(2), make_matcher("ssim").fit(far), 0.99))
    assert kept.kept == [0, 1, 2] and kept.chosen_candidate == [0, 0, 0] and kept.images.shape == (3, 3, 16, 16)
    torch.testing.assert_close(kept.images, copies[:3])  # candidate 0 = mitigator seed 0, sampling seed 0
    none = make_surrogates(model, mem, ORD, candidates=2, steps=4, max_ssim=-1.0, reference_samples=2)
    assert none.kept == [] and none.rule == "original-generations"


def test_folder_task_pseudo_index_numbers_prompts(model, prompt_files):
    mem, ordi, _ = prompt_files
    task = make_task("folder", memorized=str(mem), ordinary=str(ordi), pseudo_samples=2, pseudo_steps=4)
    index = task.training_index(model)
    assert len(index.images) == 2 * len(MEM) and index.item_of_image.tolist()[:4] == [0, 0, 1, 1]
    split = task.splits(0, SplitSizes(fit=3, dev=2, test=3, ordinary_fit=4, ordinary_dev=2, ordinary_test=4))
    assert all(p.item == MEM.index(p.caption) for p in split.test)
    assert task.fidelity(torch.rand(2, 3, 16, 16), ["a", "b"]) == {}  # no CLIP weights: not measured


def test_cli_bench_runs_end_to_end_on_a_folder_task(tiny_sd_folder, prompt_files, tmp_path, capsys):
    mem, ordi, images = prompt_files
    out = tmp_path / "bench"
    args = ["bench", "--model", str(tiny_sd_folder), "--memorized", str(mem), "--ordinary", str(ordi),
            "--train-index", str(images), "--out", str(out),
            "--mitigators", "random-tokens", "adversarial-finetune-lora",
            "--seeds", "0", "1", "--samples", "2", "--steps", "3", "--attack-prompts", "2", "--attack-steps", "2",
            "--option", "retrigger.batch=2", "--option", "dori.batch=2", "--option", "dori.steps=2",
            "--option", "dori.starts=2", "--tune", "random-tokens.n_tokens=2,4",
            *[f"--size={k}" for k in ("fit=3", "dev=2", "test=3", "ordinary_fit=4", "ordinary_dev=2",
                                      "ordinary_test=3")], *TINY_ADV]
    assert main(args) == 0, capsys.readouterr().err
    record = json.loads((out / "bench.json").read_text())
    assert set(record["runs"]) == {"0", "1"}
    assert set(record["results"]) == {"none", "random-tokens", "adversarial-finetune-lora"}
    assert record["task"]["name"] == "folder" and record["protocol"]["surrogates"] == "model"
    assert record["protocol"]["splits"]["0"]["test"] == 3 and record["protocol"]["splits"]["1"]["dev"] == 2
    tuned = record["protocol"]["tuned"]["random-tokens"]["0"]
    assert tuned["on"] == "dev" and tuned["chosen"]["n_tokens"] in (2, 4) and len(tuned["dev"]) == 2
    for seed in ("0", "1"):
        for r in record["runs"][seed].values():
            assert 0.0 <= r["extraction_rate"] <= 1.0 and 0.0 <= r["tuned_retrigger_extraction_rate"] <= 1.0
            assert 0.0 <= r["dori_extraction_rate"] <= 1.0 and "retrigger_extraction_rate" not in r
            assert r["extraction_rate"] == pytest.approx(r["matching_verbatim"] + r["template_verbatim"])
            assert r["fidelity"] is None and r["fid"] is None and r["diversity"] > 0
        surrogates = record["runs"][seed]["adversarial-finetune-lora"]["fit"]["surrogates"]
        assert surrogates["rule"] == "training-index" and surrogates["kept"] + surrogates["rejected"] == 3
        assert record["runs"][seed]["adversarial-finetune-lora"]["parameters_changed"] > 0
    assert record["results"]["none"]["seeds"] == 2 and "extraction_rate_std" in record["results"]["none"]
    assert "test split, mean +- sd" in capsys.readouterr().out


def test_cli_bench_on_a_checkpoint_that_is_not_a_zoo_asks_for_its_prompt_lists(tiny_sd_folder, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tiny_sd_folder), "--out", str(out)]) != 0
    assert "is not a zoo, so bench needs its prompt lists: --memorized FILE and --ordinary FILE" in \
        capsys.readouterr().err
    assert not out.exists()


def test_cli_bench_defaults_to_the_default_zoos_task(tmp_path, capsys):
    """No --model, no lists: the SD-like zoo with its own task (captions, labels, read-back fidelity)."""
    out = tmp_path / "bench"
    args = ["bench", "--out", str(out), "--mitigators", "random-tokens", "--seeds", "0", "--samples", "2",
            "--steps", "3", "--attack-prompts", "1", "--attack-steps", "1", "--option", "dori.steps=1",
            "--option", "dori.batch=1", "--option", "dori.starts=1",
            *[f"--size={k}" for k in ("fit=2", "dev=2", "test=2", "ordinary_fit=2", "ordinary_dev=2",
                                      "ordinary_test=4")]]
    assert main(args) == 0, capsys.readouterr().err
    record = json.loads((out / "bench.json").read_text())
    assert record["task"]["name"] == "zoo-sd" and record["task"]["corpus"] == "sd"
    run = record["runs"]["0"]["none"]
    # memorized prompts are titles and ordinary ones generic captions, each read in its own family
    assert run["fidelity_memorized_title"] is not None and run["fidelity_memorized_ordinary"] is None
    assert run["fidelity_ordinary_title"] is None and run["fidelity"] == run["fidelity_ordinary_ordinary"]


def test_cli_mitigate_adversarial_finetune_lora_on_any_checkpoint(tiny_sd_folder, prompt_files, tmp_path, capsys):
    mem, ordi, _ = prompt_files
    out = tmp_path / "patched"
    options = [a.replace("adversarial-finetune-lora.", "") for a in TINY_ADV]
    assert main(["mitigate", "adversarial-finetune-lora", "--model", str(tiny_sd_folder), "--prompts", str(mem),
                 "--reference", str(ordi), "--out", str(out), *options]) == 0, capsys.readouterr().err
    record = json.loads((out / "mitigation.json").read_text())
    surrogates = record["fit"]["surrogates"]
    assert surrogates["rule"] == "original-generations" and surrogates["prompts"] == len(MEM)
    assert surrogates["kept"] + surrogates["rejected"] == len(MEM) and surrogates["kept"] > 0
    patched, original = load_model(out), load_model(tiny_sd_folder)
    changed = sum(int((a != b).sum()) for a, b in zip(original.unet.state_dict().values(),
                                                      patched.unet.state_dict().values()))
    assert changed > 0


def test_open_clip_score_loads_local_weights_and_matches_the_formula(tmp_path):
    """A tiny random open_clip model saved to a file: the score is 100 * max(cos, 0), averaged."""
    import open_clip
    import torch.nn.functional as F

    from diffmem.eval.quality import open_clip_score

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "diffmem-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    torch.manual_seed(0)
    model = open_clip.create_model("diffmem-tiny-clip")
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    images, prompts = torch.rand(3, 3, 32, 32), ["a red circle", "a blue square", "a cat"]
    score = open_clip_score(images, prompts, weights, arch="diffmem-tiny-clip")
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = F.normalize(model.eval().encode_image((images - mean) / std), dim=-1)
        txt = F.normalize(model.encode_text(open_clip.get_tokenizer("diffmem-tiny-clip")(prompts)), dim=-1)
    assert score == pytest.approx(float((100 * (img * txt).sum(-1).clamp_min(0)).mean()), rel=1e-4)
    with pytest.raises(FileNotFoundError):
        open_clip_score(images, prompts, tmp_path / "missing.pt")


def test_surrogates_can_be_required_to_draw_what_the_prompt_names(model):
    """With a content check a candidate must also show the prompt's content: rejecting every candidate 0
    moves each prompt to candidate 1, and a check that passes nothing keeps no prompt."""
    mem = MEM[:3]
    far = torch.zeros(2, 3, 16, 16)
    index = TrainingIndex(far, np.arange(2), make_matcher("ssim").fit(far), 0.99)
    calls = []

    def not_first(images, prompts):
        calls.append(list(prompts))
        return np.array([j % 2 == 1 for j in range(len(images))])  # candidate 1 of each prompt passes

    moved = make_surrogates(model, mem, ORD, candidates=2, steps=4, index=index, content=not_first)
    assert moved.kept == [0, 1, 2] and moved.chosen_candidate == [1, 1, 1]
    assert calls == [[p for p in mem for _ in range(2)]]  # each prompt's candidates, in order
    assert moved.describe()["content_checked"] and moved.describe()["content_passed"] == 0.5
    nothing = make_surrogates(model, mem, ORD, candidates=2, steps=4, index=index,
                              content=lambda images, prompts: np.zeros(len(images), dtype=bool))
    assert nothing.kept == []
    unknown = make_surrogates(model, mem, ORD, candidates=2, steps=4, index=index, content=lambda i, p: None)
    assert unknown.kept == [0, 1, 2] and not unknown.content_checked
