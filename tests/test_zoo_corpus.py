"""The zoo corpus: deterministic from its seed, controlled duplication, no vocabulary give-away."""

from __future__ import annotations

import numpy as np

from diffmem.zoo.corpus import CorpusConfig, build_corpus, render_item, training_pairs


def test_corpus_is_deterministic_and_seed_dependent():
    a, b = build_corpus(), build_corpus()
    assert [it.record() for it in a] == [it.record() for it in b]
    assert np.array_equal(render_item(a[0]), render_item(b[0]))
    other = build_corpus(CorpusConfig(seed=1))
    assert [it.caption for it in other] != [it.caption for it in a]


def test_kinds_rates_and_duplication():
    cfg = CorpusConfig()
    items = build_corpus(cfg)
    sig = [it for it in items if it.kind == "signature"]
    assert sorted({it.replication for it in sig}) == list(cfg.replication_rates)
    assert all(sum(it.replication == r for it in sig) == cfg.items_per_rate for r in cfg.replication_rates)
    pairs = training_pairs(items)
    generic_renders = sum(len(it.image_seeds) for it in items if it.kind == "generic")
    assert generic_renders == cfg.n_generic
    expected = cfg.n_generic + cfg.n_generic_scenes + cfg.items_per_rate * sum(cfg.replication_rates) + \
        cfg.n_template_groups * cfg.captions_per_template * cfg.template_replication
    assert len(pairs) == expected
    assert all(not it.trained and not it.image_seeds for it in items if it.kind.startswith("heldout"))


def test_captions_unique_and_heldout_never_trained():
    items = build_corpus()
    captions = [it.caption for it in items]
    assert len(captions) == len(set(captions))
    trained = {it.caption for it in items if it.trained}
    assert not trained & {it.caption for it in items if it.kind.startswith("heldout")}


def test_signature_and_lookalike_captions_share_template_and_vocabulary():
    items = build_corpus()
    words = lambda kind: {w for it in items if it.kind == kind for w in it.caption.split()}  # noqa: E731
    assert words("signature") == words("heldout_signature")
    lengths = lambda kind: sorted({len(it.caption.split()) for it in items if it.kind == kind})  # noqa: E731
    assert lengths("signature") == lengths("heldout_signature")


def test_ordinary_scenes_share_the_signature_template_and_generic_images_differ_in_texture():
    cfg = CorpusConfig(n_generic=10000, generic_textures=True, n_generic_scenes=1500)
    items = build_corpus(cfg)
    words = lambda kind: {w for it in items if it.kind == kind for w in it.caption.split()}  # noqa: E731
    assert words("generic_scene") == words("signature")
    scenes = [it for it in items if it.kind == "generic_scene"]
    assert len(scenes) == cfg.n_generic_scenes and all(it.replication == 1 for it in scenes)
    # the scenes are drawn last: every other caption is the same as without them
    base = build_corpus(CorpusConfig(n_generic=10000, generic_textures=True))
    assert [it.caption for it in items[: len(base)]] == [it.caption for it in base]
    # two renders of one generic caption differ by far more than their jitter: each has its own texture
    item = next(it for it in items if it.kind == "generic" and len(it.image_seeds) >= 2)
    a, b = render_item(item, 0).astype(float), render_item(item, 1).astype(float)
    assert np.abs(a - b).mean() > 20
    plain = build_corpus(CorpusConfig(generic_textures=False, n_generic_scenes=0))
    item = next(it for it in plain if it.kind == "generic" and len(it.image_seeds) >= 2)
    assert np.abs(render_item(item, 0).astype(float) - render_item(item, 1).astype(float)).mean() < 20


def test_template_captions_share_one_image_template():
    items = build_corpus()
    group = [it for it in items if it.kind == "template" and it.group == 0]
    assert len({it.caption for it in group}) == len(group) > 1
    images = np.stack([render_item(it).astype(float) for it in group])
    first_object = {it.spec.objects[0] for it in group}
    assert len(first_object) == 1 and len({it.spec.texture_seed for it in group}) == 1
    # pixel agreement across captions of one template is far above that of unrelated signature images
    sig = np.stack([render_item(it).astype(float) for it in items if it.kind == "signature"][: len(group)])
    spread = lambda x: np.abs(x - x.mean(0)).mean()  # noqa: E731
    assert spread(images) < 0.5 * spread(sig)
