# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # diffmem quickstart: the memorization zoo, a detector scan and its evaluation
#
# Everything here runs on a laptop CPU, on the zoo that ships with diffmem.

# %%
import json

import numpy as np

from diffmem.detectors import NoiseStepEngine, make_detector
from diffmem.eval.detection import detection_metrics
from diffmem.models import load_model
from diffmem.scan import score_chunk
from diffmem.zoo.load import load_labels
from diffmem.zoo.paths import zoo_dir

model = load_model()  # the embedded zoo; pass a local Stable Diffusion folder to use another model
print(json.dumps(model.describe(), indent=1))

# %% [markdown]
# The zoo's labels were obtained by extraction: generate from every caption, compare with the training set.

# %%
labels = load_labels(zoo_dir())
memorized = [r for r in labels if r["memorized"]]
print(f"{len(memorized)} of {len(labels)} captions replicate a training image")
sample = [r for r in labels if r["kind"] == "signature" and r["replication"] == 64][:2]
sample += [r for r in labels if r["kind"] == "generic"][:2]
for r in sample:
    print(f"{r['replication']:>3}x  memorized={r['memorized']!s:<5}  {r['caption']}")

# %% [markdown]
# Generate: memorized captions snap to one image whatever the seed; generic captions vary.

# %%
from diffmem.images import image_grid  # noqa: E402

images = model.sample([r["caption"] for r in sample for _ in range(3)], seeds=[0, 1, 2] * len(sample),
                      num_inference_steps=25).images
image_grid([images[i * 3 : (i + 1) * 3] for i in range(len(sample))], scale=4)

# %% [markdown]
# Score a few hundred captions with the first-step noise-norm of Wen et al. (2024): one batched UNet
# pass per noise draw, the unconditional branch shared by all prompts.

# %%
subset = labels[::4]
engine = NoiseStepEngine(model, n_draws=4)
scores = np.concatenate([score_chunk(engine, [make_detector("noise-norm")], [r["caption"] for r in subset[i : i + 128]])
                         ["noise-norm"] for i in range(0, len(subset), 128)])
y = np.array([r["memorized"] for r in subset])
m = detection_metrics(y, scores)
print(f"noise-norm on {len(subset)} captions: AUROC {m['auroc']:.3f}, TPR@1%FPR {m['tpr@0.01fpr']['strict']:.2f}")

# %% [markdown]
# On the zoo the noise-norm ranks memorized captions *below* ordinary ones (its single-object captions
# get strong guidance; its memorized captions are scenes). What works here needs the training images:
# `make_detector("nn-margin")` generates 8 cheap clean-image estimates per caption and scores the lead
# of the nearest training image over the second nearest (AUROC 0.992, TPR@1%FPR 0.916 on the
# detection benchmark's 1,422 zoo captions; docs/scanning.md). It costs minutes on all captions, so it
# is not run in this notebook.
