"""Detector formulas against hand-computed values on a tiny random SD model, and the shared engine."""

from __future__ import annotations

import math

import pytest
import torch

from diffmem.detectors import DETECTORS, NoiseStepEngine, make_detector
from diffmem.models import load_model
from diffmem.scan import score_chunk

PROMPTS = ["a red circle in the top left on a gray background", "a photo of a cat", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def model(tiny_sd_folder):
    return load_model(tiny_sd_folder)


def _eps(model, x, t, prompt):
    emb = model.encode_prompts([prompt])
    return model.unet(x, torch.tensor([t]), encoder_hidden_states=emb).sample[0]


def test_noise_norm_matches_hand_computation(model):
    engine = NoiseStepEngine(model, n_draws=2, seed=5)
    t0 = int(model.make_sampler(50).timesteps[0])
    expected = []
    for p in PROMPTS:
        per_draw = []
        for j in range(2):
            x = torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(5 + j))
            diff = _eps(model, x, t0, p) - _eps(model, x, t0, "")
            per_draw.append(math.sqrt(sum(float(v) ** 2 for v in diff.flatten())))
        expected.append(sum(per_draw) / 2)
    got = score_chunk(engine, [make_detector("noise-norm")], PROMPTS)["noise-norm"]
    assert got == pytest.approx(expected, rel=1e-4)


def test_anisotropy_matches_hand_computation(model):
    engine = NoiseStepEngine(model, n_draws=1, seed=3)
    sched = model.make_sampler(50).timesteps
    t_hi, t_lo = int(sched[0]), int(sched[-3])
    x = torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(3))
    p = PROMPTS[0]
    norm = float((_eps(model, x, t_hi, p) - _eps(model, x, t_hi, "")).norm())
    eu, ec = _eps(model, x, t_lo, ""), _eps(model, x, t_lo, p)
    g = ec - eu
    c, h, w = eu.shape
    cosines = [float(eu[:, i, j] @ g[:, i, j] / (eu[:, i, j].norm() * g[:, i, j].norm()))
               for i in range(h) for j in range(w)]
    align = sum(cosines) / len(cosines)
    sd1 = score_chunk(engine, [make_detector("anisotropy")], [p])["anisotropy"][0]
    sd2 = score_chunk(engine, [make_detector("anisotropy", family="sd2")], [p])["anisotropy"][0]
    assert sd1 == pytest.approx(norm + 2 * align, rel=1e-4)
    assert sd2 == pytest.approx(norm + 0.1 * align, rel=1e-4)
    assert (t_hi, t_lo) == (981, 41)  # timesteps[0] and timesteps[-3] of DDIM-50 with steps_offset 1


def test_anisotropy_on_a_v_prediction_model_follows_the_reference_code(tiny_sd_v_folder):
    """Asthana et al.'s code on v-prediction (SD2): cosine on the raw UNet output, norm of their score difference
    (sqrt(a) v - x) / (1 - a) at t_hi; ``mode="epsilon"`` converts v to epsilon first and is another number."""
    vmodel = load_model(tiny_sd_v_folder)
    assert vmodel.prediction_type == "v_prediction"
    sched = vmodel.make_sampler(50).timesteps
    t_hi, t_lo = int(sched[0]), int(sched[-3])
    x = torch.randn((1, *vmodel.latent_shape), generator=torch.Generator().manual_seed(3))
    p = PROMPTS[0]
    a_hi, a_lo = float(vmodel.alphas_cumprod[t_hi]), float(vmodel.alphas_cumprod[t_lo])
    with torch.no_grad():
        v_hi = {q: _eps(vmodel, x, t_hi, q) for q in (p, "")}  # raw UNet outputs (v), not converted
        v_lo = {q: _eps(vmodel, x, t_lo, q) for q in (p, "")}

    def score(v):  # the reference's score for v-prediction models
        return (math.sqrt(a_hi) * v - x[0]) / (1 - a_hi)

    norm = float((score(v_hi[p]) - score(v_hi[""])).norm())
    vu, g = v_lo[""], v_lo[p] - v_lo[""]
    c, h, w = vu.shape
    align = sum(float(vu[:, i, j] @ g[:, i, j] / (vu[:, i, j].norm() * g[:, i, j].norm()))
                for i in range(h) for j in range(w)) / (h * w)
    engine = NoiseStepEngine(vmodel, n_draws=1, seed=3)
    got = score_chunk(engine, [make_detector("anisotropy", family="sd2")], [p])["anisotropy"][0]
    assert got == pytest.approx(norm + 0.1 * align, rel=1e-4)

    def eps(v, a):  # the epsilon form: eps = sqrt(a) v + sqrt(1 - a) x
        return math.sqrt(a) * v + math.sqrt(1 - a) * x[0]

    norm_e = float((eps(v_hi[p], a_hi) - eps(v_hi[""], a_hi)).norm())
    eu, ge = eps(v_lo[""], a_lo), eps(v_lo[p], a_lo) - eps(v_lo[""], a_lo)
    align_e = sum(float(eu[:, i, j] @ ge[:, i, j] / (eu[:, i, j].norm() * ge[:, i, j].norm()))
                  for i in range(h) for j in range(w)) / (h * w)
    det = make_detector("anisotropy", family="sd2", mode="epsilon")
    got_e = score_chunk(engine, [det], [p])["anisotropy"][0]
    assert got_e == pytest.approx(norm_e + 0.1 * align_e, rel=1e-4)
    assert norm == pytest.approx(norm_e / (1 - a_hi), rel=1e-5)  # the 1 / (1 - alpha_bar) factor
    assert abs(align - align_e) > 1e-3  # the conversion changes the cosine (the old docstring said it did not)
    with pytest.raises(ValueError, match="mode 'v' unknown"):
        make_detector("anisotropy", mode="v")


def test_calibrated_anisotropy_standardises_on_reference(model):
    """z(norm) + z(align) with each term's mean and (n - 1) std on the reference prompts, applied to other prompts."""
    reference = PROMPTS
    others = ["a blue square in the center", "a watercolor of a lighthouse"]
    det = make_detector("anisotropy-calibrated", reference_prompts=reference)
    engine = NoiseStepEngine(model, n_draws=2)
    det.prepare(engine)
    # the two terms by hand: anisotropy with gamma = (1, 0) is the norm, with gamma = (0, 1) the alignment
    terms = {}
    for name, gammas in (("norm", (1.0, 0.0)), ("align", (0.0, 1.0))):
        raw = make_detector("anisotropy", gamma1=gammas[0], gamma2=gammas[1])
        terms[name] = tuple(score_chunk(engine, [raw], texts)["anisotropy"] for texts in (reference, others))
    for name, (ref, _) in terms.items():
        assert det.stats[f"{name}_mean"] == pytest.approx(float(ref.mean()), rel=1e-5)
        assert det.stats[f"{name}_std"] == pytest.approx(float(ref.std(ddof=1)), rel=1e-4)
    expected = sum((new - ref.mean()) / ref.std(ddof=1) for ref, new in terms.values())
    got = score_chunk(engine, [det], others)["anisotropy-calibrated"]
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert got != pytest.approx([0.0, 0.0], abs=1e-2)  # other prompts are not at the reference's mean


def test_unconditional_prediction_computed_once_per_draw(model):
    engine = NoiseStepEngine(model, n_draws=4)
    sizes = []
    handle = model.unet.register_forward_hook(lambda m, a, o: sizes.append(a[0].shape[0]))
    score_chunk(engine, [make_detector("noise-norm"), make_detector("anisotropy")], PROMPTS)
    score_chunk(engine, [make_detector("noise-norm"), make_detector("anisotropy")], PROMPTS[:2])
    handle.remove()
    # two timesteps: uncond once per timestep for all 4 draws, then one batched conditional call per chunk
    assert sizes == [4, 4, 12, 12, 8, 8]
    assert engine.unet_calls == 2 * 4 + 2 * 12 + 2 * 8


def test_trajectory_mode_averages_guided_steps(model):
    det = make_detector("noise-norm-trajectory", steps=2, generations=2)
    engine = NoiseStepEngine(model, n_draws=1)
    got = score_chunk(engine, [det], PROMPTS[:1])["noise-norm-trajectory"][0]
    norms = []
    for j in range(2):
        sampler = model.make_sampler(50)
        x = model.initial_latents([j])
        emb = model.encode_prompts(PROMPTS[:1])
        for step in model.denoise(emb, x, sampler, 7.5, max_steps=2):
            norms.append(float((step.eps_cond - step.eps_uncond).norm()))
    assert got == pytest.approx(sum(norms) / 4, rel=1e-4)


def test_registry_errors_name_what_is_available():
    assert {"noise-norm", "anisotropy", "anisotropy-calibrated", "noise-norm-trajectory"} <= set(DETECTORS.names())
    with pytest.raises(KeyError, match="unknown detector 'nope'; available: .*noise-norm"):
        make_detector("nope")
    with pytest.raises(TypeError, match="has no option"):
        make_detector("noise-norm", draws=3)
    with pytest.raises(ValueError, match="family 'sd3' unknown"):
        make_detector("anisotropy", family="sd3")


def _attention_by_hand(model, prompt: str, seeds: list[int]) -> tuple[list[str], dict[str, list[torch.Tensor]]]:
    """Every cross-attention layer's head- and query-averaged attention over tokens, per draw, computed from
    its q/k projections by hand (per head softmax(q k^T / sqrt(d))), and the layers in the order they ran."""
    layers = {n: m for n, m in model.unet.named_modules() if n.endswith("attn2")}
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in layers}
    order: list[str] = []

    def hook(name):
        def record(m, args, kwargs):
            seen[name].append((args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"]))
            if name not in order:
                order.append(name)
        return record

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in layers.items()]
    t0 = int(model.make_sampler(50).timesteps[0])
    for seed in seeds:
        x = torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(seed))
        _eps(model, x, t0, prompt)
    for h in handles:
        h.remove()
    probs: dict[str, list[torch.Tensor]] = {}
    for name, attn in layers.items():
        probs[name] = []
        for hidden, context in seen[name]:
            hidden = hidden.flatten(2).transpose(1, 2) if hidden.ndim == 4 else hidden
            q, k = attn.to_q(hidden)[0], attn.to_k(context)[0]
            d = q.shape[-1] // attn.heads
            probs[name].append(torch.stack([
                torch.softmax(q[:, i * d:(i + 1) * d] @ k[:, i * d:(i + 1) * d].T / math.sqrt(d), -1)
                for i in range(attn.heads)]).mean((0, 1)))
    return order, probs


def _entropy(p: torch.Tensor) -> float:
    return -sum(float(v) * math.log(float(v)) for v in p)


def test_attention_entropy_matches_hand_computation(model):
    """Default: the 4th cross-attention layer in forward order (Ren et al.'s cheap mode); with several layers the
    attention is averaged over layers before the entropy (``reduce="attention"``), or entropies are averaged."""
    order, probs = _attention_by_hand(model, PROMPTS[1], [7, 8])
    # the tiny UNet runs down_blocks.1, mid_block, then up_blocks.0's two layers; named_modules lists the
    # mid block last, so the 4th by name would be the mid block, by forward order it is up_blocks.0's second
    assert [n.removesuffix(".transformer_blocks.0.attn2") for n in order] == [
        "down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]
    assert [n for n in probs][3] != order[3]
    fourth = order[3]
    det = make_detector("attention-entropy")
    got = score_chunk(NoiseStepEngine(model, n_draws=2, seed=7), [det], [PROMPTS[1]])["attention-entropy"]
    assert float(got[0]) == pytest.approx(sum(_entropy(p) for p in probs[fourth]) / 2, abs=2e-5)
    assert det.config()["resolved_layer"] == fourth
    assert det.unet_calls_per_prompt(NoiseStepEngine(model, n_draws=2)) == 2

    every = {"attention": [], "entropy": []}
    for j in range(2):
        every["attention"].append(_entropy(torch.stack([probs[n][j] for n in order]).mean(0)))
        every["entropy"].append(sum(_entropy(probs[n][j]) for n in order) / len(order))
    for reduce, per_draw in every.items():
        det = make_detector("attention-entropy", layers="attn2$", reduce=reduce)
        got = score_chunk(NoiseStepEngine(model, n_draws=2, seed=7), [det], [PROMPTS[1]])["attention-entropy"]
        assert float(got[0]) == pytest.approx(sum(per_draw) / 2, abs=2e-5)
    # random weights attend almost uniformly (ln 77 = 4.344), yet the reductions differ by more than the tolerance:
    # by Jensen the entropy of the mean attention is at least the mean entropy
    assert all(a - e > 2e-4 for a, e in zip(every["attention"], every["entropy"]))
    with pytest.raises(ValueError, match="reduce 'mean' unknown"):
        make_detector("attention-entropy", reduce="mean")


def test_attention_entropy_layer_number_beyond_the_unet_is_a_clear_error(model):
    from diffmem.errors import DiffmemError

    with pytest.raises(DiffmemError, match="layer_number 9 asked for, but the UNet has 4 cross-attention layers"):
        score_chunk(NoiseStepEngine(model, 1), [make_detector("attention-entropy", layer_number=9)], PROMPTS[:1])


def test_noise_norm_on_v_prediction_takes_the_raw_output_as_wens_code(tiny_sd_v_folder):
    """Wen et al.'s code: the norm of the raw UNet outputs' difference (v on SD2); ``output="epsilon"`` converts."""
    vmodel = load_model(tiny_sd_v_folder)
    engine = NoiseStepEngine(vmodel, n_draws=2, seed=5)
    p = PROMPTS[0]
    t0 = engine.timestep(0)
    x = engine.latents
    ts = torch.tensor([t0] * 2)
    with torch.no_grad():
        v_c = vmodel.unet(x, ts, encoder_hidden_states=vmodel.encode_prompts([p]).expand(2, -1, -1)).sample
        v_u = vmodel.unet(x, ts, encoder_hidden_states=vmodel.empty_embedding().expand(2, -1, -1)).sample
    expected = float((v_c - v_u).flatten(1).norm(dim=1).mean())
    raw = score_chunk(engine, [make_detector("noise-norm")], [p])["noise-norm"][0]
    eps = score_chunk(engine, [make_detector("noise-norm", output="epsilon")], [p])["noise-norm"][0]
    a0 = float(vmodel.alphas_cumprod[t0])
    assert raw == pytest.approx(expected, rel=1e-4) and raw == pytest.approx(eps / math.sqrt(a0), rel=1e-4)
    traj = {o: score_chunk(NoiseStepEngine(vmodel, n_draws=1, seed=5),
                           [make_detector("noise-norm-trajectory", steps=3, generations=1, output=o)],
                           [p])["noise-norm-trajectory"][0] for o in ("raw", "epsilon")}
    # along the trajectory each step is weighted by its own 1 / sqrt(alpha_bar_t): not one constant factor
    factors = [1 / math.sqrt(float(vmodel.alphas_cumprod[int(t)])) for t in vmodel.make_sampler(50).timesteps[:3]]
    assert min(factors) < traj["raw"] / traj["epsilon"] < max(factors)
    with pytest.raises(ValueError, match="output 'v' unknown"):
        make_detector("noise-norm", output="v")


def test_sharpness_matches_finite_differences(model):
    engine = NoiseStepEngine(model, n_draws=1, seed=11)
    t0 = engine.timestep(0)
    scale = -1 / math.sqrt(1 - float(engine.sampler.alphas_cumprod[t0]))
    x = engine.latents.double()
    unet = model.unet.double()
    try:
        def score_difference(z):
            emb_c, emb_u = model.encode_prompts([PROMPTS[2]]).double(), model.empty_embedding().double()
            eps_c = unet(z, torch.tensor([t0]), encoder_hidden_states=emb_c).sample
            eps_u = unet(z, torch.tensor([t0]), encoder_hidden_states=emb_u).sample
            return (eps_c - eps_u) * scale
        with torch.no_grad():
            v = score_difference(x)
            h = 1e-4
            jv = (score_difference(x + h * v) - score_difference(x - h * v)) / (2 * h)
    finally:
        unet.float()
    got = make_detector("sharpness").score_prompts(model, model.encode_prompts([PROMPTS[2]]), engine)
    assert float(got[0]) == pytest.approx(float(jv.norm()), rel=1e-3)


def test_sharpness_on_a_v_prediction_model_follows_jeons_code(tiny_sd_v_folder):
    """Jeon et al.'s code on v-prediction (SD2): score (sqrt(a) v - x) / (1 - a) with x held fixed, its Jacobian
    difference applied to its score difference, by central finite differences on the raw UNet output (v). The
    true-score form (``mode="epsilon"``) is that number times (1 - a): the issue's 1 / (1 - alpha_bar)."""
    vmodel = load_model(tiny_sd_v_folder)
    assert vmodel.prediction_type == "v_prediction"
    engine = NoiseStepEngine(vmodel, n_draws=1, seed=11)
    t0 = engine.timestep(0)
    a = float(engine.sampler.alphas_cumprod[t0])
    x = engine.latents.double()
    unet = vmodel.unet.double()
    try:
        emb_c = vmodel.encode_prompts([PROMPTS[2]]).double()
        emb_u = vmodel.empty_embedding().double()

        def reference_score_difference(z):  # (sqrt(a) v(z) - x) / (1 - a), conditional minus unconditional
            v_c = unet(z, torch.tensor([t0]), encoder_hidden_states=emb_c).sample
            v_u = unet(z, torch.tensor([t0]), encoder_hidden_states=emb_u).sample
            return ((math.sqrt(a) * v_c - x) - (math.sqrt(a) * v_u - x)) / (1 - a)

        with torch.no_grad():
            d = reference_score_difference(x)
            h = 1e-4
            jd = (reference_score_difference(x + h * d) - reference_score_difference(x - h * d)) / (2 * h)
    finally:
        unet.float()
    emb = vmodel.encode_prompts([PROMPTS[2]])
    ref = float(make_detector("sharpness").score_prompts(vmodel, emb, engine)[0])
    eps = float(make_detector("sharpness", mode="epsilon").score_prompts(vmodel, emb, engine)[0])
    assert ref == pytest.approx(float(jd.norm()), rel=1e-3)
    assert ref == pytest.approx(eps / (1 - a), rel=1e-5)
    assert 1 / (1 - a) > 1.001  # the two modes are different numbers at this timestep
    with pytest.raises(ValueError, match="sharpness mode 'v' unknown"):
        make_detector("sharpness", mode="v")


def test_sharpness_modes_agree_on_an_epsilon_model(model):
    ref = score_chunk(NoiseStepEngine(model, n_draws=1, seed=11), [make_detector("sharpness")], PROMPTS)["sharpness"]
    eps = score_chunk(NoiseStepEngine(model, n_draws=1, seed=11), [make_detector("sharpness", mode="epsilon")],
                      PROMPTS)["sharpness"]
    assert ref == pytest.approx(eps, rel=1e-6) and min(ref) > 0


def test_noise_step_detectors_share_the_engine_pass(model):
    """noise-norm, attention entropy and sharpness together: one unconditional pass per draw, one conditional
    pass per prompt and draw (attention recorded in it, sharpness's JVP direction taken from it), then the JVP."""
    engine = NoiseStepEngine(model, n_draws=2)
    dets = [make_detector("noise-norm"), make_detector("attention-entropy"), make_detector("sharpness")]
    together = score_chunk(engine, dets, PROMPTS)
    assert engine.unet_calls == 2 + 3 * 2 + 2 * 3 * 2
    for det in dets:  # the same scores as each detector alone
        alone = score_chunk(NoiseStepEngine(model, n_draws=2), [det], PROMPTS)[det.name]
        assert together[det.name] == pytest.approx(alone, rel=1e-5)


def test_attention_layers_found_by_pattern_or_a_clear_error(model):
    from diffmem.errors import DiffmemError

    with pytest.raises(DiffmemError, match="no cross-attention layers matching 'nothing_here'"):
        score_chunk(NoiseStepEngine(model, 1), [make_detector("attention-entropy", layers="nothing_here")], PROMPTS[:1])


def test_combined_is_the_sum_of_member_z_scores_on_the_reference(model):
    engine = NoiseStepEngine(model, n_draws=2)
    det = make_detector("combined", members=["noise-norm", "attention-entropy"], reference_prompts=PROMPTS)
    det.prepare(engine)
    members = score_chunk(engine, [make_detector("noise-norm"), make_detector("attention-entropy")], PROMPTS)
    expected = sum((v - v.mean()) / v.std(ddof=1) for v in members.values())
    got = score_chunk(engine, [det], PROMPTS)["combined"]
    assert got == pytest.approx(expected, abs=1e-6)
    assert det.unet_calls_per_prompt(engine) == 2  # attention entropy is read during noise-norm's pass
    with pytest.raises(ValueError, match="at least 2 reference_prompts"):
        make_detector("combined").prepare(engine)
    with pytest.raises(ValueError, match=r"member_options for \['nn-margin'\], which are not members"):
        make_detector("combined", member_options={"nn-margin": {"samples": 2}})
    margin = make_detector("combined", members=["noise-norm", "nn-margin"],
                           member_options={"nn-margin": {"samples": 3}})
    assert margin._members[1].samples == 3


def test_nn_ratio_and_margin_match_hand_computation(model):
    """1 - mean over seeds of d(n1)/d(n2), and mean of sim(n1) - sim(n2), of x0 after ``stop_after`` steps."""
    import numpy as np

    from diffmem.attacks.base import TrainingIndex
    from diffmem.eval.matching import make_matcher
    from diffmem.eval.similarity import ssim_pairs

    g = torch.Generator().manual_seed(3)
    h = model.decode(model.initial_latents([0])).shape[-1]
    train = torch.rand(6, 3, h, h, generator=g)
    index = TrainingIndex(train, np.arange(6), make_matcher("ssim", candidates=6).fit(train), 0.5)
    ratio, margin = make_detector("nn-ratio", samples=2, steps=5, stop_after=2), make_detector(
        "nn-margin", samples=2, steps=5, stop_after=2)
    ratio._index = margin._index = index
    engine = NoiseStepEngine(model, n_draws=1, seed=4)
    got = score_chunk(engine, [ratio, margin], PROMPTS[:1])
    ratios, margins = [], []
    emb = model.encode_prompts(PROMPTS[:1])
    for j in range(2):
        sampler = model.make_sampler(5)
        x = model.initial_latents([4 + j]) * sampler.init_noise_sigma
        steps = list(model.denoise(emb, x, sampler, 7.5, max_steps=2))
        image = model.decode(steps[-1].x0)
        sims = sorted(ssim_pairs(image.repeat(6, 1, 1, 1), train).tolist(), reverse=True)
        ratios.append((1 - sims[0]) / (1 - sims[1]))
        margins.append(sims[0] - sims[1])
    assert got["nn-ratio"][0] == pytest.approx(1 - sum(ratios) / 2, rel=1e-4)
    assert got["nn-margin"][0] == pytest.approx(sum(margins) / 2, rel=1e-4)
    assert ratio.unet_calls_per_prompt(engine) == 2 * 2 * 2


def test_early_estimate_rejects_a_stop_step_outside_the_schedule(model):
    emb = model.encode_prompts(PROMPTS[:1])
    with pytest.raises(ValueError, match="stop_after"):
        model.early_estimate(emb, [0], num_inference_steps=4, stop_after=5)


def test_nn_ratio_reads_a_training_image_folder(model, tmp_path):
    """A copy of a generation in the folder makes its prompt's ratio small (score near 1)."""
    from PIL import Image

    det = make_detector("nn-ratio", samples=1, steps=3, stop_after=3, index=str(tmp_path), index_size=16)
    emb = model.encode_prompts(PROMPTS[:1])
    image = model.early_estimate(emb, [0], num_inference_steps=3, stop_after=3)[0]
    g = torch.Generator().manual_seed(0)
    for i, img in enumerate([image] + [torch.rand(3, 16, 16, generator=g) for _ in range(5)]):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(arr).resize((16, 16)).save(tmp_path / f"{i}.png")
    score = score_chunk(NoiseStepEngine(model, n_draws=1, seed=0), [det], PROMPTS[:1])["nn-ratio"][0]
    assert score > 0.5


def test_seed_per_prompt_scores_do_not_depend_on_the_batch_and_match_a_hand_run(model):
    """Wen et al.'s convention: prompt i's draws are the first D samples of a generator seeded seed + i."""
    dets = [make_detector("noise-norm"), make_detector("anisotropy"), make_detector("attention-entropy"),
            make_detector("sharpness")]
    batch = score_chunk(NoiseStepEngine(model, n_draws=2, seed=5, seed_per_prompt=True), dets, PROMPTS, [0, 1, 2])
    alone = score_chunk(NoiseStepEngine(model, n_draws=2, seed=5, seed_per_prompt=True), dets, [PROMPTS[1]], [1])
    for d in dets:
        assert float(alone[d.name][0]) == pytest.approx(float(batch[d.name][1]), rel=1e-5, abs=1e-6)
    t0 = int(model.make_sampler(50).timesteps[0])
    x = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(5 + 1))
    with torch.no_grad():
        norms = [float((_eps(model, x[j : j + 1], t0, PROMPTS[1]) - _eps(model, x[j : j + 1], t0, "")).norm())
                 for j in range(2)]
    assert float(alone["noise-norm"][0]) == pytest.approx(sum(norms) / 2, rel=1e-4)
    shared = score_chunk(NoiseStepEngine(model, n_draws=2, seed=5), dets[:1], [PROMPTS[1]])
    assert float(shared["noise-norm"][0]) != pytest.approx(float(alone["noise-norm"][0]), rel=1e-3)
    with pytest.raises(ValueError, match="pass prompt_ids"):
        score_chunk(NoiseStepEngine(model, n_draws=2, seed_per_prompt=True), dets[:1], PROMPTS)


def test_seed_per_prompt_costs_an_unconditional_pass_per_prompt(model):
    engine = NoiseStepEngine(model, n_draws=2, seed_per_prompt=True)
    score_chunk(engine, [make_detector("noise-norm"), make_detector("attention-entropy")], PROMPTS, [0, 1, 2])
    assert engine.unet_calls == 3 * 2 + 3 * 2  # unconditional and conditional for every prompt and draw
    seeds = engine.generation_seeds(2, 3, offset=10, prompt_ids=[4, 0])
    assert seeds == [10 + 12, 10 + 13, 10 + 14, 10, 11, 12]  # prompt i: i * per_prompt + j, set by its index alone
    assert NoiseStepEngine(model, n_draws=2).generation_seeds(2, 2) == [0, 1, 0, 1]


def test_trajectory_with_seed_per_prompt_draws_from_one_generator_per_prompt(model):
    det = make_detector("noise-norm-trajectory", steps=1, generations=2)
    engine = NoiseStepEngine(model, n_draws=1, seed=3, seed_per_prompt=True)
    got = score_chunk(engine, [det], PROMPTS[:2], [7, 8])["noise-norm-trajectory"][1]
    x = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(3 + 8))
    sampler = model.make_sampler(50)
    steps = list(model.denoise(model.encode_prompts([PROMPTS[1]]), x * sampler.init_noise_sigma, sampler, 7.5,
                               max_steps=1))
    assert got == pytest.approx(float((steps[0].eps_cond - steps[0].eps_uncond).flatten(1).norm(dim=1).mean()),
                                rel=1e-4)


def test_nn_margin_measures_the_margin_to_the_nearest_other_duplicate_group(model):
    """An index holding copies of the memorized image (as real training sets do): without deduplication its
    nearest and second-nearest neighbours are both copies and the margin is 0; with it (default) the margin is
    taken to the nearest other group and is large. The groups are counted in the detector's config."""
    import numpy as np

    from diffmem.attacks.base import TrainingIndex
    from diffmem.eval.matching import make_matcher

    emb = model.encode_prompts(PROMPTS[:1])
    image = model.early_estimate(emb, [0], num_inference_steps=3, stop_after=3)  # what nn-margin generates
    g = torch.Generator().manual_seed(0)
    others = torch.rand(4, *image.shape[1:], generator=g)
    train = torch.cat([image, others[:2], image, image, others[2:]])  # three copies of the memorized image
    scores = {}
    for dedup in (True, False):
        det = make_detector("nn-margin", samples=1, steps=3, stop_after=3, dedup=dedup)
        det._index = TrainingIndex(train, np.arange(len(train)), make_matcher("ssim").fit(train), 0.5)
        engine = NoiseStepEngine(model, n_draws=1, seed=0)
        scores[dedup] = float(score_chunk(engine, [det], PROMPTS[:1])["nn-margin"][0])
        if dedup:
            assert det.config()["training_index"] == {"images": 7, "groups": 5, "exact_copies": 2,
                                                      "near_duplicates": 0, "near_duplicate_rms": 0.01}
    second = float(ssim_pairs_max(image, others))
    assert scores[False] == pytest.approx(0.0, abs=1e-6)
    assert scores[True] == pytest.approx(1.0 - second, abs=1e-5) and scores[True] > 0.5


def ssim_pairs_max(image: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    from diffmem.eval.similarity import ssim_pairs

    return ssim_pairs(image.expand_as(others), others).max()


def test_image_detectors_compare_with_the_scanned_models_own_training_images(tiny_sd_folder, tmp_path):
    """nn-margin without an index uses the training set of the zoo the model came from; a model that is not a
    zoo must name its training images (it used to be compared with the shipped zoo's, silently)."""
    from diffmem.errors import DiffmemError
    from diffmem.models import load_model
    from diffmem.prompts import prompts_from_list
    from diffmem.scan import ScanSettings, run_scan
    from diffmem.zoo.paths import zoo_dir

    margin = make_detector("nn-margin", samples=1, steps=2, stop_after=1)
    margin.bind(load_model("zoo:collapse"))
    assert margin._zoo == zoo_dir("collapse").resolve()
    other = make_detector("combined", members=["noise-norm", "nn-margin"])
    with pytest.raises(DiffmemError, match=r"not a diffmem zoo: give them with --option nn-margin.index=FOLDER"):
        run_scan(load_model(tiny_sd_folder), prompts_from_list(["a red circle"]), [other], tmp_path / "scan",
                 ScanSettings(n_draws=1), progress=False)
    assert not (tmp_path / "scan").exists()  # refused before anything was written


def test_deepssim_detectors_refuse_a_non_zoo_model_without_its_own_embedder(tiny_sd_folder):
    """The zoo's DeepSSIM embedder knows 32x32 synthetic scenes only: another model must bring its own."""
    from diffmem.errors import DiffmemError
    from diffmem.models import load_model

    model = load_model(tiny_sd_folder)
    with pytest.raises(DiffmemError, match=r"--option deepssim-seeds.embedder=FOLDER"):
        make_detector("deepssim-seeds").bind(model)
    make_detector("deepssim-seeds", embedder="/some/embedder").bind(model)  # named: accepted
    with pytest.raises(DiffmemError, match=r"set_index"):
        make_detector("deepssim-train", embedder="/some/embedder").bind(model)


@pytest.mark.parametrize("name", ["nn-margin", "nn-ratio", "deepssim-seeds", "deepssim-train"])
def test_an_unbound_image_space_detector_refuses_instead_of_using_the_default_zoo(model, name):
    """Scoring before bind() once compared generations with the *default* zoo's training images, whatever the
    model: since the SD-like zoo became the default, a collapse-zoo scan was silently matched to SD-zoo images."""
    from diffmem.errors import DiffmemError

    detector = make_detector(name, samples=2, steps=2) if name.startswith("deepssim") else make_detector(
        name, samples=1, steps=2, stop_after=1)
    with pytest.raises(DiffmemError, match=rf"{name} needs .* neither bound to the scanned model"):
        score_chunk(NoiseStepEngine(model, n_draws=1, seed=0), [detector], PROMPTS[:1])
