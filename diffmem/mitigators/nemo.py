"""NeMo: localise and block memorization neurons in cross-attention value projections (Hintersdorf et al.,
"Finding NeMo", NeurIPS 2024; code: ml-research/localizing_memorization_in_diffusion_models), as its authors
run it. File references below are to that repository.

- Layers: the value projections ``attn2.to_v`` of the down and mid blocks' transformers
  (``utils/activation_detection.py`` L51-60: 7 layers on SD1.x), found by name pattern.
- Memorization signal: the first-step noise difference of 10 seeds (``3_detect_memorized_neurons.py``
  L125), without guidance (L132, ``guidance_scale`` 0): ``eps(x_T, t_1, c) - x_T`` at the second
  timestep of a 50-step schedule (``activation_detection.py`` L155-181, ``early_stopping=1``; the latents
  are not stepped), min-max scaled per sample and channel (L182-184). A prompt is memorized on the seeds
  whose noise difference has a max pairwise SSIM with the other seeds above the threshold (L117-129,
  3_detect L51-58: none above, nothing to localise). Blocking moves the signal away from the unblocked
  one; the stop criterion is the max over those seeds of SSIM(unblocked, blocked) (3_detect L82-85).
- Threshold: 0.428 on SD1.4 (3_detect L128-130), mean + 1 std of the max pairwise SSIM on ordinary
  prompts; ``fit`` re-derives it that way on the given ordinary prompts unless ``threshold`` is set.
- Initial selection (``activation_detection.py`` L87-114): per channel the mean |activation| over tokens at
  the first step without guidance, its two-sided z-score ``|a - mu| / sigma`` against activation
  statistics (``1_compute_activations_statistics.py`` L47-63) of many prompts of the memorized captions' own
  distribution (the reference: 50k LAION prompts). ``fit(..., statistics_prompts=...)`` takes them (the bench
  passes its task's :meth:`~diffmem.tasks.base.BenchTask.statistics_prompts`: on the zoos, never-trained
  captions of the memorized captions' families); without them the ordinary prompts stand in. Neurons with
  z > theta plus the top-k by |a|; theta from 5 down by 0.25 to 1 and k from 0 up by 1 together until the
  signal falls to the threshold (3_detect L70-97, L133-138).
  If theta reaches its minimum first, the refinement threshold becomes the signal reached (L95-97).
- Refinement (``activation_detection.py`` L193-258): whole layers, then single neurons, last layer first,
  are unblocked when the signal stays at or below the refinement threshold (the reference's ``<``; ``<=``
  here so that a neuron without effect is also dropped when refining against the signal reached). The
  widest candidate set is never returned unrefined.
- Blocking multiplies the neurons' outputs by 0 (3_detect L127, ``scaling_factor`` 0).

Two ways to deploy it:

- ``nemo`` (faithful, an inference mitigator): each prompt's own neurons are blocked by a forward hook when
  that prompt is sampled (``model.sample(prompts, seeds)``). NeMo is a per-prompt method: a prompt it was not
  fitted on is localised the first time it is sampled, against the fit's activation statistics and threshold
  (a prompt without memorization signal gets no neurons and runs unblocked), as a deployment that checks each
  incoming prompt would. An embedding attack on a prompt (DoRI) runs against ``model.for_prompt(prompt)``, the
  model with that prompt's neurons blocked, as Finding Dori attacks NeMo. Calls that give embeddings with no
  prompt (the noise-step detectors) run with the union of the fitted prompts' neurons blocked. The per-prompt
  sets and the statistics are saved in ``mitigation.json`` and re-applied by ``--mitigation``.
- ``nemo-union`` (a weight mitigator, a different method): the union of the fitted prompts' sets zeroed
  into ``to_v``'s rows, a pruned checkpoint for that stated prompt set; ``describe_fit`` reports the share
  of the layers' neurons it removes.

Latent sizes of the zoo are far below what MS-SSIM's five scales need (the reference's
``multiscale_structural_similarity_index_measure``, kernel 11): diffmem uses single-scale SSIM
(:func:`diffmem.eval.similarity.ssim_pairs`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from diffmem.errors import DiffmemError
from diffmem.eval.similarity import ssim_pairs
from diffmem.mitigators.base import (
    MITIGATORS,
    InferenceMitigator,
    PatchedModel,
    WeightMitigator,
    check_prompt_lists,
    clone_model,
)
from diffmem.mitigators.hooks import find_modules, first_step_activations, fuse_adapters, zeroed_channels
from diffmem.models.model import DiffusionModel, SampleOutput

Selection = dict[str, list[int]]


def mean_abs_over_tokens(x: torch.Tensor) -> torch.Tensor:
    """NeMo's activation summary: ``(draws, tokens, channels)`` -> ``(channels,)``, mean |a| over the tokens of
    the first draw."""
    return x[0].abs().mean(0)


def as_index(selection: Selection) -> dict[str, torch.Tensor]:
    return {n: torch.tensor(sorted(v), dtype=torch.long) for n, v in selection.items() if v}


@torch.no_grad()
def noise_differences(model: DiffusionModel, embedding: torch.Tensor, latents: torch.Tensor, t: int,
                      modules: dict[str, nn.Module], blocked: Selection) -> torch.Tensor:
    """NeMo's signal image per seed: ``eps(x_T, t, c) - x_T`` without guidance, min-max scaled per sample
    and channel to [0, 1], with the ``blocked`` neurons' outputs zeroed. ``(S, C, h, w)``."""
    with zeroed_channels(modules, as_index(blocked)):
        eps = model.predict_noise(latents, t, embedding).float()
    d = eps - latents.float()
    lo, hi = d.amin((2, 3), keepdim=True), d.amax((2, 3), keepdim=True)
    return (d - lo) / (hi - lo).clamp_min(1e-12)


def max_pairwise_ssim(images: torch.Tensor) -> torch.Tensor:
    """Per image, its largest SSIM with any other image of the set (``activation_detection.py`` L117-129)."""
    pairs = torch.combinations(torch.arange(len(images)), r=2)
    sim = ssim_pairs(images[pairs[:, 0]], images[pairs[:, 1]])
    out = torch.full((len(images),), -1.0)
    for (i, j), s in zip(pairs.tolist(), sim.tolist()):
        out[i], out[j] = max(out[i], s), max(out[j], s)
    return out


@dataclass
class NeMoSettings:
    """NeMo's options and the localisation shared by ``nemo`` and ``nemo-union``."""

    pattern: str = r"(down_blocks|mid_block).*attn2\.to_v$"
    seeds: int = 10  # samples_per_prompt (3_detect L125)
    seed: int = 1  # 3_detect L124
    theta_start: float = 5.0  # initial_theta (3_detect L136)
    theta_min: float = 1.0  # min_theta (L134)
    theta_step: float = 0.25  # theta_reduction_per_step (L133)
    max_k: int = 1280  # 3_detect L95
    num_inference_steps: int = 50  # L126: the schedule whose second timestep is read
    threshold: float | None = None  # None: mean + 1 std of the max pairwise SSIM on ordinary prompts
    threshold_prompts: int = 64  # ordinary prompts the threshold is derived from

    def _modules(self, unet: nn.Module) -> dict[str, nn.Module]:
        """The value projections in a fixed order (down blocks before the mid block); an unfused LoRA wrapper
        stands for its layer (its output is the layer's output)."""
        return dict(sorted(find_modules(unet, self.pattern).items()))

    def _setup(self, model: DiffusionModel) -> tuple[torch.Tensor, int]:
        latents = model.initial_latents([self.seed + j for j in range(self.seeds)])
        return latents, int(model.make_sampler(self.num_inference_steps).timesteps[1])

    def derive_threshold(self, model: DiffusionModel, ordinary: list[str]) -> float:
        """Mean + 1 std over ordinary prompts of their largest max pairwise SSIM across seeds (how the
        reference's 0.428 was set for SD1.4)."""
        modules = self._modules(model.unet)
        latents, t = self._setup(model)
        emb = model.encode_prompts(ordinary[: self.threshold_prompts])
        peaks = [float(max_pairwise_ssim(noise_differences(model, emb[i : i + 1], latents, t, modules, {})).max())
                 for i in range(len(emb))]
        return float(np.mean(peaks) + np.std(peaks))

    def activation_statistics(self, model: DiffusionModel, prompts: list[str], modules: dict[str, nn.Module]
                              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per layer and channel, the mean and (n - 1) standard deviation over ``prompts`` of the mean |value
        activation| over tokens at the first step, conditional branch, seed ``seed``
        (``1_compute_activations_statistics.py`` L47-63): what the z-scores are measured against."""
        if len(prompts) < 2:
            raise DiffmemError(f"NeMo's activation statistics need at least 2 prompts, got {len(prompts)}")
        stats = first_step_activations(model, prompts, modules, mean_abs_over_tokens, use_input=False, draws=1,
                                       seed=self.seed)
        return ({n: a.mean(0) for n, a in stats.items()}, {n: a.std(0).clamp_min(1e-6) for n, a in stats.items()})

    def prepare(self, model: DiffusionModel, ordinary: list[str], statistics_prompts: list[str] | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The activation statistics (mean, std per layer and channel) and, unless set, the threshold: what
        localising any prompt needs."""
        if self.seeds < 2:
            raise DiffmemError(f"NeMo's signal compares seeds: seeds must be >= 2, got {self.seeds}")
        modules = self._modules(model.unet)
        mu, sigma = self.activation_statistics(model, statistics_prompts or ordinary, modules)
        if self.threshold is None:
            self.threshold = self.derive_threshold(model, ordinary)
        return mu, sigma

    def localise_prompts(self, model: DiffusionModel, prompts: list[str], mu: dict[str, torch.Tensor],
                         sigma: dict[str, torch.Tensor]) -> tuple[dict[str, Selection], list[dict[str, Any]]]:
        """Each prompt's refined neurons (empty when it shows no memorization signal) and its run record."""
        modules = self._modules(model.unet)
        latents, t = self._setup(model)
        acts = first_step_activations(model, prompts, modules, mean_abs_over_tokens, use_input=False, draws=1,
                                      seed=self.seed)
        per_prompt: dict[str, Selection] = {}
        runs = []
        for i, prompt in enumerate(prompts):
            z = {n: (acts[n][i] - mu[n]).abs() / sigma[n] for n in modules}  # two-sided (L104)
            sel, run = self.localise(model, model.encode_prompts([prompt]), modules, latents, t, z,
                                     {n: acts[n][i] for n in modules})
            per_prompt[prompt] = sel
            runs.append(run)
        return per_prompt, runs

    def localise_all(self, model: DiffusionModel, memorized: list[str], ordinary: list[str],
                     statistics_prompts: list[str] | None = None) -> tuple[dict[str, Selection], dict[str, Any]]:
        """Per memorized prompt its refined neurons, and a summary of the run. ``statistics_prompts``: the
        z-scores' reference (default ``ordinary``)."""
        mu, sigma = self.prepare(model, ordinary, statistics_prompts)
        self._statistics = (mu, sigma)
        per_prompt, runs = self.localise_prompts(model, memorized, mu, sigma)
        summary = {"threshold": self.threshold, "prompts": len(memorized),
                   "statistics_prompts": len(statistics_prompts or ordinary),
                   "statistics_from": "statistics prompts" if statistics_prompts else "ordinary prompts",
                   "memorized_by_signal": sum(r["memorized"] for r in runs),
                   "reached_threshold": sum(r.get("reached", False) for r in runs),
                   "initial_neurons": [r.get("initial", 0) for r in runs],
                   "neurons_per_prompt": [sum(len(v) for v in s.values()) for s in per_prompt.values()]}
        return per_prompt, summary

    def localise(self, model: DiffusionModel, embedding: torch.Tensor, modules: dict[str, nn.Module],
                 latents: torch.Tensor, t: int, z: dict[str, torch.Tensor], act: dict[str, torch.Tensor]
                 ) -> tuple[Selection, dict[str, Any]]:
        """One prompt: initial selection, then refinement (see the module docstring)."""
        assert self.threshold is not None
        vanilla_all = noise_differences(model, embedding, latents, t, modules, {})
        keep = max_pairwise_ssim(vanilla_all) > self.threshold
        if not keep.any():
            return {}, {"memorized": False}
        lat, vanilla = latents[keep], vanilla_all[keep]

        def signal(sel: Selection) -> float:
            return float(ssim_pairs(vanilla, noise_differences(model, embedding, lat, t, modules, sel)).max())

        theta, k, target = self.theta_start, 0, self.threshold
        while True:
            sel = {n: sorted(set((z[n] > theta).nonzero().flatten().tolist())
                             | set(act[n].abs().topk(min(k, len(act[n]))).indices.tolist())) for n in modules}
            reached = signal(sel)
            if reached <= self.threshold:
                break
            if theta > self.theta_min:
                theta -= self.theta_step
            k += 1
            if theta <= self.theta_min or k >= self.max_k:
                target = reached  # refine against the signal reached (3_detect L95-97)
                break
        initial = sum(len(v) for v in sel.values())
        refined = self.refine(sel, signal, target)
        return refined, {"memorized": True, "reached": reached <= self.threshold, "initial": initial}

    @staticmethod
    def refine(sel: Selection, signal, target: float) -> Selection:
        """Unblock whole layers, then single neurons, last layer first, while the signal stays <= target."""
        sel = {n: list(v) for n, v in sel.items()}
        for name in reversed(list(sel)):
            if sel[name] and signal({**sel, name: []}) <= target:
                sel[name] = []
        for name in reversed(list(sel)):
            for neuron in list(sel[name]):
                trial = {**sel, name: [c for c in sel[name] if c != neuron]}
                if signal(trial) <= target:
                    sel = trial
        return {n: v for n, v in sel.items() if v}


def union(per_prompt: dict[str, Selection]) -> Selection:
    out: dict[str, set[int]] = {}
    for sel in per_prompt.values():
        for n, v in sel.items():
            out.setdefault(n, set()).update(v)
    return {n: sorted(v) for n, v in sorted(out.items())}


@MITIGATORS.register("nemo")
@dataclass
class NeMo(NeMoSettings, InferenceMitigator):
    """Block each prompt's own value neurons by a hook whenever that prompt is sampled; a prompt not localised at
    fit is localised the first time it is sampled (``localise_unseen``), against the fit's statistics."""

    name = "nemo"
    localise_unseen: bool = True
    neurons: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # fit state: prompt -> layer -> ids
    statistics: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # fit state: layer -> mu, sigma
    _localised: dict[str, Selection] = field(default_factory=dict, init=False, repr=False)  # unseen prompts

    def fit(self, model: DiffusionModel, memorized: list[str], ordinary: list[str],
            statistics_prompts: list[str] | None = None) -> None:
        """Localise each memorized prompt's neurons; ``statistics_prompts``: prompts of the memorized captions'
        own distribution for the activation statistics (default: ``ordinary``)."""
        check_prompt_lists(memorized, ordinary)
        self.neurons, self._summary = self.localise_all(model, memorized, ordinary, statistics_prompts)
        mu, sigma = self._statistics
        self.statistics = {n: {"mu": mu[n].tolist(), "sigma": sigma[n].tolist()} for n in mu}

    def describe_fit(self) -> dict:
        blocked = union(self.neurons)
        return {**getattr(self, "_summary", {}), "threshold": self.threshold,
                "union_neurons": sum(len(v) for v in blocked.values())}

    def neurons_of(self, model: DiffusionModel, prompts: list[str]) -> dict[str, Selection]:
        """Each prompt's neurons: fitted, else localised now and remembered (``localise_unseen``), else none."""
        cache = self._localised
        unseen = [p for p in dict.fromkeys(prompts) if p not in self.neurons and p not in cache and p != ""]
        if unseen and self.localise_unseen and self.statistics and self.threshold is not None:
            mu = {n: torch.tensor(v["mu"]) for n, v in self.statistics.items()}
            sigma = {n: torch.tensor(v["sigma"]) for n, v in self.statistics.items()}
            found, _ = self.localise_prompts(model, unseen, mu, sigma)
            cache.update(found)
        return {p: self.neurons.get(p, cache.get(p, {})) for p in prompts}

    def apply(self, model: DiffusionModel) -> DiffusionModel:
        modules = self._modules(model.unet)
        unknown = sorted({n for sel in self.neurons.values() for n in sel} - set(modules))
        if unknown:
            raise DiffmemError(f"nemo: the model has no layers {unknown[:3]} that the mitigation names; was it fitted "
                               "on another architecture?")
        mitigator, everything = self, union(self.neurons)

        class PerPromptBlocking(PatchedModel):
            _blocking: Selection = everything
            prompt_specific = True

            def predict_noise(self, latents, timesteps, embeddings, scheduler=None):
                with zeroed_channels(modules, as_index(self._blocking)):
                    return super().predict_noise(latents, timesteps, embeddings, scheduler)

            def for_prompt(self, prompt: str) -> DiffusionModel:
                view = copy.copy(self)
                view._blocking = mitigator.neurons_of(model, [prompt])[prompt]
                return view

            def sample(self, prompts=None, seeds=None, *, embeddings=None, **kwargs) -> SampleOutput:
                if embeddings is not None or prompts is None:
                    return super().sample(prompts, seeds, embeddings=embeddings, **kwargs)
                prompts = list(prompts)
                seeds = list(range(len(prompts))) if seeds is None else list(seeds)
                if len(seeds) != len(prompts):
                    raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; expected one seed per prompt")
                per_prompt = mitigator.neurons_of(model, prompts)
                groups: dict[str, list[int]] = {}
                for i, p in enumerate(prompts):  # prompts sharing a neuron set are sampled together
                    groups.setdefault(repr(per_prompt[p]), []).append(i)
                images: list[torch.Tensor | None] = [None] * len(prompts)
                finals: list[torch.Tensor | None] = [None] * len(prompts)
                blocking = self._blocking
                try:
                    for rows in groups.values():
                        self._blocking = per_prompt[prompts[rows[0]]]
                        out = super().sample([prompts[i] for i in rows], [seeds[i] for i in rows], **kwargs)
                        for j, i in enumerate(rows):
                            images[i], finals[i] = out.images[j], out.latents[j]
                finally:
                    self._blocking = blocking
                return SampleOutput(images=torch.stack(images), latents=torch.stack(finals))

        return PerPromptBlocking.of(model)


@MITIGATORS.register("nemo-union")
@dataclass
class NeMoUnion(NeMoSettings, WeightMitigator):
    """NeMo's localisation, the union over the stated prompts zeroed into the weights (a pruned checkpoint)."""

    name = "nemo-union"

    def fit(self, model: DiffusionModel, memorized: list[str], ordinary: list[str],
            statistics_prompts: list[str] | None = None) -> None:
        """As :meth:`NeMo.fit`, then the union zeroed into a copy of the weights."""
        check_prompt_lists(memorized, ordinary)
        per_prompt, self._summary = self.localise_all(model, memorized, ordinary, statistics_prompts)
        self._model = clone_model(model)
        fuse_adapters(self._model.unet)
        modules = self._modules(self._model.unet)
        self._neurons = union(per_prompt)
        with torch.no_grad():
            for n, rows in self._neurons.items():
                modules[n].weight[rows] = 0
                if modules[n].bias is not None:
                    modules[n].bias[rows] = 0
        self._total = sum(m.out_features for m in modules.values())

    def patched(self) -> DiffusionModel:
        if not hasattr(self, "_model"):
            raise RuntimeError("call fit() before patched()")
        return self._model

    def describe_fit(self) -> dict:
        neurons = getattr(self, "_neurons", {})
        removed = sum(len(v) for v in neurons.values())
        return {**getattr(self, "_summary", {}), "neurons": neurons, "total_neurons": removed,
                "neuron_share_removed": removed / self._total if getattr(self, "_total", 0) else None}
