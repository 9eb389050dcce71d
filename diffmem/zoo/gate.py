"""The corpus gate: can any faithful detector separate a corpus's memorized captions? Checked before training.

Noise-step detectors read the first-step guidance ``eps(x_T, c) - eps(x_T, empty)``. For an ideal
denoiser (the minimiser of the training loss, no model) Tweedie's formula gives
``E[x0 | x_t, c] = (x_t - sqrt(1 - a_t) eps(x_t, c)) / sqrt(a_t)``, so at the first (noisiest) step,
where ``E[x0 | x_t, c] ~ E[x0 | c]``, the guidance is proportional to ``E[x0 | c] - E[x0]``: the
distance of a caption's mean training image from the mean of the whole training distribution
(Wen et al. 2024 read its norm; Ross et al. 2024 and Jeon et al. 2025 argue from the same identity).
If that *proxy distance* does not rank duplicated captions above ordinary ones, a model that fits its
data cannot be expected to either, and the corpus, not the detector, decides the result.

:func:`check_corpus` computes, for a :class:`CorpusView` (training images, their captions, kinds and
duplication), in the zoo VAE's latent space (the space the zoo's UNet trains in) and in pixel space:

- the proxy distance of every trained caption: ``|| mean(latents of its training examples) - mean(latents
  of all training examples) ||`` (duplicates weighted as training weights them);
- the AUROC of that distance for duplicated captions (``signature``, replication >= 4) against ordinary
  ones (``generic``): the gate, target >= 0.95; the same per replication rate, for templates, and
  against once-seen titles (those are single images, so the ideal denoiser cannot separate them from
  duplicates: only duplication, through a model that does not fit once-seen items, can);
- the share of the ordinary captions' latent variance explained by the caption (R^2);
- per-caption diversity: the mean pairwise SSIM of a caption's training examples;
- balance of memorized and non-memorized captions drawn from one generator: length, a leave-one-out
  naive-Bayes vocabulary classifier (AUROC 0.5 = no give-away), once-seen items per duplicated one
  per family, and each title word's share of training examples that come from duplicated images.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

DUPLICATED_MIN_RATE = 4
GATE_TARGET = 0.95
FIRST_STEP_ALPHA_BAR = 0.005775495897978544  # SD v1's scaled-linear schedule at t = 981 (50-step DDIM's first)


@dataclass
class CorpusView:
    """What the gate needs of a corpus: unique training images and which caption each example trains.

    ``pair_item[k]`` and ``pair_image[k]`` are the caption and the unique image of training example
    ``k`` of one epoch (a caption duplicated ``r`` times has ``r`` examples of one image).
    """

    name: str
    captions: list[str]
    kinds: list[str]
    families: list[str]
    replication: np.ndarray  # (n_items,)
    images: np.ndarray  # (M, 32, 32, 3) uint8
    pair_item: np.ndarray  # (P,)
    pair_image: np.ndarray  # (P,)

    @property
    def n_items(self) -> int:
        return len(self.captions)


def _view_from_pairs(name: str, items, pairs: list[tuple[int, int]], render, families: list[str]) -> CorpusView:
    keys: dict[tuple[int, int], int] = {}
    images = []
    for item_id, copy in pairs:
        if (item_id, copy) not in keys:
            keys[(item_id, copy)] = len(images)
            images.append(render(items[item_id], copy))
    return CorpusView(
        name=name, captions=[it.caption for it in items], kinds=[it.kind for it in items], families=families,
        replication=np.array([it.replication for it in items], dtype=np.int64),
        images=np.stack(images), pair_item=np.array([p[0] for p in pairs], dtype=np.int64),
        pair_image=np.array([keys[p] for p in pairs], dtype=np.int64),
    )


def corpus_view(corpus: str, config=None) -> CorpusView:
    """The training set of the ``"sd"`` corpus (:mod:`diffmem.zoo.sd_corpus`) or of the ``"collapse"``
    corpus (:mod:`diffmem.zoo.corpus`, the shipped zoo's), built from ``config`` (default: its default)."""
    if corpus == "sd":
        from diffmem.zoo.sd_corpus import SDCorpusConfig, build_sd_corpus, render_sd_item, sd_training_pairs

        items = build_sd_corpus(config or SDCorpusConfig())
        return _view_from_pairs("sd", items, sd_training_pairs(items), render_sd_item, [it.family for it in items])
    if corpus == "collapse":
        from diffmem.zoo.corpus import CorpusConfig, build_corpus, render_item, training_pairs

        items = build_corpus(config or CorpusConfig())
        families = ["object" if it.kind in ("generic", "heldout_generic") else "scene" for it in items]
        return _view_from_pairs("collapse", items, training_pairs(items), render_item, families)
    raise ValueError(f"unknown corpus {corpus!r}; expected 'sd' or 'collapse'")


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def load_zoo_vae(path: str | Path | None = None):
    """A VAE folder as float32 in eval mode (default: the collapse zoo's ``pipeline/vae``, the VAE every corpus
    was first gated in; a built zoo's own VAE is ``--vae DIR/pipeline/vae``)."""
    from diffusers import AutoencoderKL

    if path is None:
        from diffmem.zoo.paths import zoo_pipeline_path

        path = zoo_pipeline_path("collapse") / "vae"
    return AutoencoderKL.from_pretrained(str(path), torch_dtype=torch.float32).eval()


@torch.no_grad()
def latent_features(images: np.ndarray, vae, batch_size: int = 512) -> np.ndarray:
    """Scaled VAE posterior means (what the UNet is trained on, up to its noise), flattened, float64."""
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        out.append(z.reshape(len(z), -1).double().numpy())
    return np.concatenate(out)


@torch.no_grad()
def vae_roundtrip_ssim(images: np.ndarray, vae, n: int = 256, seed: int = 0) -> dict:
    """SSIM of ``n`` random training images with their VAE reconstruction (posterior mean): how faithfully
    the latent space the proxy is computed in represents this corpus."""
    from diffmem.eval.similarity import ssim_pairs

    idx = np.sort(np.random.default_rng(seed).permutation(len(images))[:n])
    x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 255.0
    rec = ((vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample + 1) / 2).clamp(0, 1)
    s = ssim_pairs(rec, x).numpy()
    return {"n": int(len(idx)), "mean": round(float(s.mean()), 4), "p05": round(float(np.quantile(s, 0.05)), 4)}


def pixel_features(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


# --------------------------------------------------------------------------------------------
# The proxy and its AUROC
# --------------------------------------------------------------------------------------------


def auroc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """AUROC of ``positives`` against ``negatives`` (sklearn's ``roc_auc_score``: P(positive > negative) +
    0.5 P(tie)); NaN when either side is empty."""
    pos, neg = np.asarray(positives, dtype=np.float64), np.asarray(negatives, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    labels = np.concatenate([np.ones(len(pos), dtype=bool), np.zeros(len(neg), dtype=bool)])
    return float(roc_auc_score(labels, np.concatenate([pos, neg])))


def caption_means(features: np.ndarray, view: CorpusView) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per-caption mean over its training examples, NaN rows for untrained captions; examples per
    caption; mean over all training examples = E[x0] of the training distribution)."""
    sums = np.zeros((view.n_items, features.shape[1]))
    np.add.at(sums, view.pair_item, features[view.pair_image])
    counts = np.bincount(view.pair_item, minlength=view.n_items).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    return means, counts, features[view.pair_image].mean(0)


def proxy_distances(features: np.ndarray, view: CorpusView) -> np.ndarray:
    """``|| E[x0 | c] - E[x0] ||`` per caption under the training distribution (NaN if untrained)."""
    means, _, overall = caption_means(features, view)
    return np.linalg.norm(means - overall, axis=1)


def _mask(view: CorpusView, kind: str, min_rate: int = 0, max_rate: int | None = None) -> np.ndarray:
    kinds = np.array(view.kinds)
    m = (kinds == kind) & (view.replication >= min_rate)
    if max_rate is not None:
        m &= view.replication <= max_rate
    return m


def _summary(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"n": 0}
    return {"n": int(len(values)), "median": round(float(np.median(values)), 4),
            "p05": round(float(np.quantile(values, 0.05)), 4), "p95": round(float(np.quantile(values, 0.95)), 4)}


def explained_variance(features: np.ndarray, view: CorpusView, kind: str = "generic") -> float:
    """Share of the variance of ``kind``'s training examples explained by their caption (between / total)."""
    sel = _mask(view, kind)[view.pair_item]
    x, item = features[view.pair_image[sel]], view.pair_item[sel]
    mu = x.mean(0)
    total = float(((x - mu) ** 2).sum())
    means, counts, _ = caption_means(features, view)
    ids = np.unique(item)
    between = float((counts[ids][:, None] * (means[ids] - mu) ** 2).sum())
    return between / total if total > 0 else float("nan")


def proxy_report(features: np.ndarray, view: CorpusView) -> dict:
    """Proxy-distance AUROCs and distance summaries in one feature space."""
    dist = proxy_distances(features, view)
    ordinary = dist[_mask(view, "generic")]
    dup = _mask(view, "signature", DUPLICATED_MIN_RATE)
    out: dict = {"auroc_duplicated_vs_ordinary": round(auroc(dist[dup], ordinary), 4)}
    rates = sorted({int(r) for r in view.replication[_mask(view, "signature")]})
    out["auroc_by_rate_vs_ordinary"] = {str(r): round(auroc(dist[_mask(view, "signature", r, r)], ordinary), 4)
                                        for r in rates}
    if _mask(view, "template").any():
        out["auroc_template_vs_ordinary"] = round(auroc(dist[_mask(view, "template")], ordinary), 4)
    if _mask(view, "title").any():
        out["auroc_duplicated_vs_once_seen_titles"] = round(auroc(dist[dup], dist[_mask(view, "title")]), 4)
    out["distance"] = {kind: _summary(dist[_mask(view, kind)]) for kind in dict.fromkeys(view.kinds)
                       if _mask(view, kind).any() and not kind.startswith("heldout")}
    out["distance"]["duplicated"] = _summary(dist[dup])
    out["ordinary_variance_explained_by_caption"] = round(explained_variance(features, view), 4)
    return out


def ideal_guidance_norms(features: np.ndarray, view: CorpusView, alpha_bar: float = FIRST_STEP_ALPHA_BAR,
                         draws: int = 16, seed: int = 0) -> np.ndarray:
    """Mean over ``draws`` noise draws x_T of ``|| E[x0 | x_t, c] - E[x0 | x_t] ||`` under the ideal denoiser of
    the training set (a mixture of its examples, duplicates weighted), at ``x_t = sqrt(a) x0 + sqrt(1-a) n``
    drawn from pure noise as a sampler starts. Times ``sqrt(a / (1 - a))`` it is Wen et al. (2024)'s
    first-step noise-norm ``|| eps(x_t, c) - eps(x_t, empty) ||`` of a model that fits its data exactly.

    Unlike :func:`proxy_distances` (the ``a -> 0`` limit), the posterior over a caption's images is not flat:
    ``log w_i = sqrt(a) <x_t, x_i> / (1 - a) - a ||x_i||^2 / (2 (1 - a)) + log(count_i)``, so a caption with
    many images is pulled towards the one nearest ``x_t``. NaN for untrained captions.
    """
    keys, counts = np.unique(np.stack([view.pair_item, view.pair_image], 1), axis=0, return_counts=True)
    item, image = keys[:, 0], keys[:, 1]  # sorted by item
    starts = np.flatnonzero(np.r_[True, item[1:] != item[:-1]])
    trained = item[starts]
    log_count = np.log(counts.astype(np.float64))
    sq = (features**2).sum(1)
    rng = np.random.default_rng(seed)
    total = np.zeros(view.n_items)
    for _ in range(draws):
        x_t = rng.standard_normal(features.shape[1])  # pure noise, as the sampler starts
        logit_img = (math.sqrt(alpha_bar) * features @ x_t - alpha_bar * sq / 2) / (1 - alpha_bar)
        logits = logit_img[image] + log_count
        # unconditional: every example of the corpus
        w = np.exp(logits - logits.max())
        uncond = (w[:, None] * features[image]).sum(0) / w.sum()
        # conditional: a softmax within each caption's examples
        seg_max = np.maximum.reduceat(logits, starts)
        w = np.exp(logits - np.repeat(seg_max, np.diff(np.r_[starts, len(logits)])))
        cond = np.add.reduceat(w[:, None] * features[image], starts) / np.add.reduceat(w, starts)[:, None]
        total[trained] += np.linalg.norm(cond - uncond, axis=1)
    out = np.full(view.n_items, np.nan)
    out[trained] = total[trained] / draws
    return out


def first_step_report(features: np.ndarray, view: CorpusView, draws: int = 16, seed: int = 0) -> dict:
    """AUROCs of :func:`ideal_guidance_norms` at the first step of a 50-step DDIM schedule (t = 981)."""
    g = ideal_guidance_norms(features, view, draws=draws, seed=seed)
    ordinary = g[_mask(view, "generic")]
    dup = _mask(view, "signature", DUPLICATED_MIN_RATE)
    out: dict = {"timestep": 981, "alpha_bar": round(FIRST_STEP_ALPHA_BAR, 6), "draws": draws,
                 "auroc_duplicated_vs_ordinary": round(auroc(g[dup], ordinary), 4)}
    if _mask(view, "title").any():
        out["auroc_duplicated_vs_once_seen_titles"] = round(auroc(g[dup], g[_mask(view, "title")]), 4)
    out["norm"] = {"generic": _summary(ordinary), "duplicated": _summary(g[dup])}
    return out


# --------------------------------------------------------------------------------------------
# Diversity and balance
# --------------------------------------------------------------------------------------------


def training_example_similarity(view: CorpusView, kind: str, max_captions: int = 200, max_examples: int = 8,
                                seed: int = 0, min_rate: int = 0) -> dict:
    """Mean pairwise SSIM of a caption's training examples (duplicates included: copies score 1),
    over up to ``max_captions`` captions of ``kind`` with >= 2 examples, ``max_examples`` each."""
    from diffmem.eval.similarity import pairwise_ssim

    rng = np.random.default_rng(seed)
    examples: dict[int, list[int]] = {}
    for item, image in zip(view.pair_item.tolist(), view.pair_image.tolist()):
        examples.setdefault(item, []).append(image)
    ids = [i for i in np.flatnonzero(_mask(view, kind, min_rate)).tolist() if len(examples.get(i, [])) >= 2]
    ids = [ids[j] for j in rng.permutation(len(ids))[:max_captions]]
    if not ids:
        return {"n_captions": 0}
    groups = []
    for i in ids:
        ex = examples[i]
        groups.append([ex[j] for j in rng.permutation(len(ex))[:max_examples]])
    used = sorted({j for g in groups for j in g})
    position = {j: p for p, j in enumerate(used)}
    unit = torch.from_numpy(view.images[used]).permute(0, 3, 1, 2).float() / 255.0
    per_caption = pairwise_ssim(unit, [[position[j] for j in g] for g in groups])
    return {"n_captions": len(ids), "mean": round(float(per_caption.mean()), 4),
            "p95": round(float(np.quantile(per_caption, 0.95)), 4), "max": round(float(per_caption.max()), 4)}


def _naive_bayes_loo_auroc(pos: list[list[str]], neg: list[list[str]]) -> float:
    """AUROC of a leave-one-out multinomial naive-Bayes word classifier (add-one smoothing):
    0.5 when vocabulary carries no information about the class."""
    counts = [Counter(w for c in pos for w in c), Counter(w for c in neg for w in c)]
    totals = [sum(counts[0].values()), sum(counts[1].values())]
    vocab = len(set(counts[0]) | set(counts[1]))
    n_docs = [len(pos), len(neg)]

    def score(words: list[str], own: int) -> float:
        s = math.log((n_docs[0] - (own == 0)) / (n_docs[1] - (own == 1)))
        mine = Counter(words)
        t0, t1 = totals[0] - (own == 0) * len(words), totals[1] - (own == 1) * len(words)
        for w in words:
            c0, c1 = counts[0][w] - (own == 0) * mine[w], counts[1][w] - (own == 1) * mine[w]
            s += math.log((c0 + 1) / (t0 + vocab)) - math.log((c1 + 1) / (t1 + vocab))
        return s

    return auroc(np.array([score(c, 0) for c in pos]), np.array([score(c, 1) for c in neg]))


def _words(caption: str) -> list[str]:
    return caption.replace(",", " ").split()


def balance_report(view: CorpusView) -> dict:
    """Do length, vocabulary or family give memorized captions away against captions of the same generator
    that are not memorized (once-seen ``title`` items if the corpus has them, else never-trained look-alikes)?"""
    kinds = np.array(view.kinds)
    other_kind = "title" if (kinds == "title").any() else "heldout_signature"
    sig, other = np.flatnonzero(kinds == "signature"), np.flatnonzero(kinds == other_kind)
    words = [_words(c) for c in view.captions]
    out: dict = {"compared_with": other_kind}
    lens = np.array([len(w) for w in words], dtype=np.float64)
    chars = np.array([len(c) for c in view.captions], dtype=np.float64)
    out["auroc_word_count"] = round(auroc(lens[sig], lens[other]), 4)
    out["auroc_char_count"] = round(auroc(chars[sig], chars[other]), 4)
    out["auroc_vocabulary_naive_bayes_loo"] = round(_naive_bayes_loo_auroc([words[i] for i in sig],
                                                                          [words[i] for i in other]), 4)
    other_vocab = {w for i in other for w in words[i]}
    out["signature_words_seen_in_other"] = round(float(np.mean([w in other_vocab for i in sig for w in words[i]])), 4)
    fams = np.array(view.families)
    examples = np.bincount(view.pair_item, minlength=view.n_items)
    out["per_family"] = {}
    for f in sorted(set(fams[sig].tolist())):
        n_sig = int(((kinds == "signature") & (fams == f)).sum())
        n_other = int(((kinds == other_kind) & (fams == f)).sum())
        fam_examples = examples[fams == f]
        # a never-trained caption of the family that the model cannot tell apart falls on the family's
        # training distribution: the duplicated images' share of it bounds how often it regurgitates
        dup_share = float(fam_examples[view.replication[fams == f] >= 2].sum()) / max(int(fam_examples.sum()), 1)
        out["per_family"][str(f)] = {"signature": n_sig, other_kind: n_other,
                                     f"{other_kind}_per_signature": round(n_other / max(n_sig, 1), 2),
                                     "duplicated_share_of_training_examples": round(dup_share, 4)}
    # each word's share of training examples that come from duplicated images (replication >= 2):
    # a look-alike caption sharing a word with a memorized one is pulled towards its image by that share
    dup_examples, all_examples = Counter(), Counter()
    title_like = np.isin(kinds, ["signature", "title", "template"])
    for i in np.flatnonzero(title_like & (examples > 0)):
        n = int(examples[i])
        for w in set(words[i]):
            all_examples[w] += n
            if view.replication[i] >= 2:
                dup_examples[w] += n
    share = {w: dup_examples[w] / all_examples[w] for w in all_examples}
    if share:
        vals = np.array(list(share.values()))
        out["word_duplicated_share"] = {"mean": round(float(vals.mean()), 4), "max": round(float(vals.max()), 4),
                                        "max_word": max(share, key=share.get)}
        look = [max(share.get(w, 0.0) for w in words[i]) for i in np.flatnonzero(kinds == "heldout_signature")]
        if look:
            out["lookalike_max_word_duplicated_share"] = _summary(np.array(look))
    return out


# --------------------------------------------------------------------------------------------
# The whole check
# --------------------------------------------------------------------------------------------


def check_corpus(view: CorpusView, vae=None, ssim_captions: int = 200, roundtrip_images: int = 256,
                 first_step_draws: int = 16, seed: int = 0) -> dict:
    """Every gate figure of ``view`` (see the module docstring); ``vae`` defaults to the shipped zoo's."""
    torch.manual_seed(seed)
    vae = vae if vae is not None else load_zoo_vae()
    latent = latent_features(view.images, vae)
    report: dict = {
        "corpus": view.name,
        "n_captions": view.n_items,
        "n_trained_captions": int((np.bincount(view.pair_item, minlength=view.n_items) > 0).sum()),
        "n_training_examples": int(len(view.pair_item)),
        "n_unique_images": int(len(view.images)),
        "kinds": dict(Counter(view.kinds)),
        "duplicated_means": f"signature captions with replication >= {DUPLICATED_MIN_RATE}",
        "latent": proxy_report(latent, view),
        "latent_first_step": first_step_report(latent, view, draws=first_step_draws, seed=seed),
        "pixel": proxy_report(pixel_features(view.images), view),
        "diversity_ssim": {
            "generic": training_example_similarity(view, "generic", ssim_captions, seed=seed),
            "duplicated": training_example_similarity(view, "signature", ssim_captions, seed=seed,
                                                      min_rate=DUPLICATED_MIN_RATE),
            "template": training_example_similarity(view, "template", ssim_captions, seed=seed),
        },
        "balance": balance_report(view),
        "vae_roundtrip_ssim": vae_roundtrip_ssim(view.images, vae, n=roundtrip_images, seed=seed),
    }
    value = report["latent"]["auroc_duplicated_vs_ordinary"]
    report["gate"] = {"statistic": "latent auroc_duplicated_vs_ordinary", "value": value, "target": GATE_TARGET,
                      "passed": bool(value >= GATE_TARGET)}
    return report


def format_report(report: dict) -> str:
    """A few lines for the terminal."""
    lat, pix, div, bal = report["latent"], report["pixel"], report["diversity_ssim"], report["balance"]
    lines = [
        f"corpus {report['corpus']}: {report['n_trained_captions']} trained captions, "
        f"{report['n_training_examples']} training examples, {report['n_unique_images']} unique images",
        f"ideal-denoiser proxy AUROC, duplicated (>= {DUPLICATED_MIN_RATE}x) vs ordinary: "
        f"latent {lat['auroc_duplicated_vs_ordinary']:.3f}, pixel {pix['auroc_duplicated_vs_ordinary']:.3f} "
        f"(gate >= {GATE_TARGET}: {'PASS' if report['gate']['passed'] else 'FAIL'})",
        "  by rate (latent): " + ", ".join(f"{r}x {v:.3f}" for r, v in lat["auroc_by_rate_vs_ordinary"].items()),
        f"  first DDIM step (t=981) of a denoiser that fits every training image: "
        f"{report['latent_first_step']['auroc_duplicated_vs_ordinary']:.3f}",
        f"  ordinary latent variance explained by the caption: {lat['ordinary_variance_explained_by_caption']:.3f}",
    ]
    if "auroc_duplicated_vs_once_seen_titles" in lat:
        lines.append(f"  duplicated vs once-seen titles (latent): {lat['auroc_duplicated_vs_once_seen_titles']:.3f}"
                     " (0.5 expected: an ideal denoiser fits every once-seen image)")
    lines.append("mean pairwise SSIM of a caption's training examples: "
                 + ", ".join(f"{k} {v['mean']:.3f}" for k, v in div.items() if v.get("n_captions")))
    lines.append(f"balance vs {bal['compared_with']}: word-count AUROC {bal['auroc_word_count']:.3f}, "
                 f"vocabulary (naive Bayes, leave-one-out) AUROC {bal['auroc_vocabulary_naive_bayes_loo']:.3f}, "
                 f"signature words seen in {bal['compared_with']} {bal['signature_words_seen_in_other']:.3f}")
    return "\n".join(lines)
