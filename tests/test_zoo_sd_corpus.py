"""The SD-like corpus (diffmem/zoo/sd_corpus.py) and the corpus gate (diffmem/zoo/gate.py)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from tiny_sd_zoo import TINY_SD

from diffmem.zoo.gate import (
    CorpusView,
    auroc,
    balance_report,
    check_corpus,
    corpus_view,
    explained_variance,
    ideal_guidance_norms,
    pixel_features,
    proxy_distances,
    proxy_report,
)
from diffmem.zoo.sd_corpus import (
    FAMILIES,
    SDCorpusConfig,
    build_sd_corpus,
    describe,
    render_sd_item,
    sd_training_pairs,
)

SMALL = SDCorpusConfig(n_base=12, n_extended=4, titles_per_family=200, signatures_per_rate=2,
                       heldout_signature_per_family=20, template_groups_per_family=1)


@pytest.fixture(scope="module")
def items():
    return build_sd_corpus()


def _by_kind(items, kind, family=None):
    return [it for it in items if it.kind == kind and (family is None or it.family == family)]


def test_corpus_is_deterministic_and_seed_dependent():
    a, b = build_sd_corpus(SMALL), build_sd_corpus(SMALL)
    assert [it.record() for it in a] == [it.record() for it in b]
    for it in (a[0], _by_kind(a, "signature")[0], _by_kind(a, "template")[0]):
        assert np.array_equal(render_sd_item(it), render_sd_item(b[it.item_id]))
    other = build_sd_corpus(SDCorpusConfig(**{**SMALL.to_dict(), "seed": 1}))
    assert [it.caption for it in _by_kind(other, "title")] != [it.caption for it in _by_kind(a, "title")]
    json.dumps([it.record() for it in a])  # the manifest is JSON-serialisable


def test_duplication_rates_and_training_pairs(items):
    cfg = SDCorpusConfig()
    for family in FAMILIES:
        sig = _by_kind(items, "signature", family)
        assert Counter(it.replication for it in sig) == {r: cfg.signatures_per_rate for r in cfg.replication_rates}
        assert all(len(it.image_seeds) == 1 for it in sig)
        # >= 10 once-seen titles of the same family per duplicated one
        assert len(_by_kind(items, "title", family)) >= cfg.min_titles_per_signature * len(sig)
    pairs = sd_training_pairs(items)
    per_item = Counter(i for i, _ in pairs)
    for it in items:
        assert per_item.get(it.item_id, 0) == it.replication * len(it.image_seeds)
    assert all(it.replication == 1 and len(it.image_seeds) == 1 for it in _by_kind(items, "title"))
    # memorization only by duplication: a small share of the unique images is duplicated
    unique = sum(len(it.image_seeds) for it in items if it.trained)
    duplicated = sum(len(it.image_seeds) for it in items if it.trained and it.replication > 1)
    assert duplicated / unique < 0.02
    # ordinary captions have many training images each
    assert min(len(it.image_seeds) for it in _by_kind(items, "generic")) == cfg.n_extended >= 16


def test_too_few_once_seen_titles_per_signature_is_refused():
    # 2 families x 4 rates x 2 signatures: 8 per family need >= 80 once-seen titles per family
    with pytest.raises(ValueError, match="fewer than 10 once-seen titles"):
        build_sd_corpus(SDCorpusConfig(**{**SMALL.to_dict(), "titles_per_family": 79}))
    enough = build_sd_corpus(SDCorpusConfig(**{**SMALL.to_dict(), "titles_per_family": 80}))
    assert len(_by_kind(enough, "title")) == 160


def test_memorized_and_once_seen_titles_come_from_one_generator(items):
    for family in FAMILIES:
        sig, once = _by_kind(items, "signature", family), _by_kind(items, "title", family)
        look = _by_kind(items, "heldout_signature", family)
        slots = lambda group: [set(ws) for ws in zip(*(it.caption.replace(",", "").split() for it in group))]  # noqa: E731
        # same template (one word count) and every word of a memorized title in the once-seen titles' slot
        assert {len(it.caption.split()) for it in sig} == {len(it.caption.split()) for it in once + look}
        for s_sig, s_once in zip(slots(sig), slots(once)):
            assert s_sig <= s_once
        assert {it.named for it in sig} == {it.named for it in once} == {it.named for it in look}
    # no title names a colour, shape, position or size; "poster" names the style, as in "a poster of a red cross"
    descriptive = {w for it in _by_kind(items, "generic") for w in it.caption.split()} - {"a", "of", "in", "the"}
    shared = descriptive & {w for it in _by_kind(items, "title") for w in it.caption.replace(",", "").split()}
    assert shared == {"poster"}


def test_lookalikes_never_trained_and_captions_unique(items):
    captions = [it.caption for it in items]
    assert len(captions) == len(set(captions))
    trained = {it.caption for it in items if it.trained}
    for kind in ("heldout_generic", "heldout_signature", "heldout_template"):
        held = _by_kind(items, kind)
        assert held and all(not it.trained and it.replication == 0 and not it.image_seeds for it in held)
        assert not trained & {it.caption for it in held}
    untrained = {it.item_id for it in items if not it.trained}
    assert not untrained & {i for i, _ in sd_training_pairs(items)}


def test_ordinary_captions_are_under_specified(items):
    item = next(it for it in _by_kind(items, "generic") if it.caption == "a red circle")
    scenes = [item.scene(c) for c in range(len(item.image_seeds))]
    # the named factors hold in every image ...
    assert all(s.main.color == "red" and s.main.shape == "circle" for s in scenes)
    # ... and the unnamed ones vary across them
    assert len({s.main.position for s in scenes}) == 5 and len({s.style for s in scenes}) == 2
    assert len({s.main.size for s in scenes}) == 2
    a, b = render_sd_item(item, 0).astype(float), render_sd_item(item, 1).astype(float)
    assert np.abs(a - b).mean() > 20
    poster = next(it for it in _by_kind(items, "generic") if it.caption == "a poster of a blue cross")
    assert all(poster.scene(c).style == "poster" for c in range(len(poster.image_seeds)))
    assert describe(poster.named) == poster.caption


def test_no_ordinary_caption_names_a_position_and_legacy_records_rebuild_the_old_grammar(items):
    """Build 4 names style and size besides colour and shape; position is left to chance in every image (its
    denoisers never learned the four corners). A zoo.json without ``extra_factors`` (builds 1-3) rebuilds the
    grammar with position, caption for caption."""
    from diffmem.zoo.build import ZooConfig, sd_zoo_config
    from diffmem.zoo.sd_corpus import ordinary_meanings

    ordinary = _by_kind(items, "generic") + _by_kind(items, "heldout_generic")
    assert not any(it.named.position for it in ordinary) and not any(" in the " in it.caption for it in ordinary)
    assert {it.named.size for it in ordinary} == {None, "small", "large"}
    assert {it.named.style for it in ordinary} == {None, "painting", "poster"}
    for it in ordinary[:5]:
        assert len({it.scene(c).main.position for c in range(len(it.image_seeds))}) > 1
    record = sd_zoo_config(corpus=SMALL).to_dict()
    del record["corpus"]["extra_factors"]
    legacy = ZooConfig.from_dict(record).corpus
    assert legacy.extra_factors == ("style", "position", "size")
    old = [it for it in build_sd_corpus(legacy) if it.family == "ordinary"]
    assert "a red circle in the top left" in {it.caption for it in old}
    base, extended = ordinary_meanings(legacy.extra_factors)
    assert len(old) == len(base) + len(extended) == len(base) * 10  # 2 styles + 5 positions + 2 sizes
    with pytest.raises(ValueError, match="unknown named factor"):
        ordinary_meanings(("style", "mood"))


def test_template_captions_share_one_image_template(items):
    group = [it for it in items if it.kind == "template" and it.group == 0]
    assert len(group) > 1 and len({it.template_seed for it in group}) == 1
    mains = {it.scene().main for it in group}
    assert len(mains) == 1
    images = np.stack([render_sd_item(it).astype(float) for it in group])
    once = _by_kind(items, "title", group[0].family)[: len(group)]
    titles = np.stack([render_sd_item(it).astype(float) for it in once])
    spread = lambda x: np.abs(x - x.mean(0)).mean()  # noqa: E731
    assert spread(images) < 0.3 * spread(titles)
    # the captions of a group share their stem (the artist, or the city and year)
    assert len({it.caption.split(" ", 2)[2] for it in group}) == 1


def _stem_words(caption: str) -> set[str]:
    return set(caption.replace(",", "").split()[-2:])  # the artist, or the city and year


def test_template_stems_name_no_other_title_of_their_family(items):
    """Build 3's rule: a template group's stem words (artist; city and year) occur in no once-seen title,
    signature or look-alike of the family and in no other group, so a look-alike cannot call up a template image
    by a shared stem word (10 of build 2's 22 memorized look-alikes did)."""
    assert SDCorpusConfig().reserved_template_stems
    for family in FAMILIES:
        groups: dict[int, set[str]] = {}
        for it in _by_kind(items, "template", family):
            groups.setdefault(it.group, set()).update(_stem_words(it.caption))
        assert len(groups) == 3 and all(len(words) == 2 for words in groups.values())
        reserved = set().union(*groups.values())
        assert len(reserved) == 6  # no two groups share a stem word
        others = [it for kind in ("title", "signature", "heldout_signature") for it in _by_kind(items, kind, family)]
        assert len(others) > 1500 and not any(_stem_words(it.caption) & reserved for it in others)


def test_records_without_the_reserved_stems_field_rebuild_build_2s_corpus():
    """A zoo.json written before ``reserved_template_stems`` existed (build 2, shipped) rebuilds its corpus with
    the old generator: template stems drawn after the titles and free to recur in them."""
    from diffmem.zoo.build import ZooConfig, sd_zoo_config

    record = sd_zoo_config(corpus=SMALL).to_dict()
    del record["corpus"]["reserved_template_stems"]
    legacy = ZooConfig.from_dict(record).corpus
    assert legacy.reserved_template_stems is False
    old, new = build_sd_corpus(legacy), build_sd_corpus(SMALL)
    assert [it.caption for it in old] != [it.caption for it in new]
    # the old generator draws the template stem after every title, so the titles equal a corpus without templates
    no_templates = build_sd_corpus(SDCorpusConfig(**{**legacy.to_dict(), "template_groups_per_family": 0}))
    assert [it.caption for it in no_templates] == [it.caption for it in old if "template" not in it.kind]


# --------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------


def test_auroc_hand_computed():
    # pairs (pos, neg): (3,1) 1, (3,2) 1, (2,1) 1, (2,2) 0.5 -> 3.5 / 4
    assert auroc(np.array([3.0, 2.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)
    assert auroc(np.array([1.0]), np.array([2.0, 3.0])) == 0.0
    assert auroc(np.array([5.0, 5.0]), np.array([5.0])) == 0.5
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 50).astype(float)  # many ties
    from sklearn.metrics import roc_auc_score

    ref = roc_auc_score(np.r_[np.ones(40), np.zeros(50)], np.r_[pos, neg])
    assert auroc(pos, neg) == pytest.approx(ref)


def _toy_view() -> tuple[CorpusView, np.ndarray]:
    """Two ordinary captions (images 1, -1 and 3, 1), one caption duplicated twice (image 4)."""
    features = np.array([[1.0], [-1.0], [3.0], [1.0], [4.0]])
    view = CorpusView(name="toy", captions=["o1", "o2", "memo"], kinds=["generic", "generic", "signature"],
                      families=["ordinary", "ordinary", "t"], replication=np.array([1, 1, 4]),
                      images=np.zeros((5, 32, 32, 3), dtype=np.uint8),
                      pair_item=np.array([0, 0, 1, 1, 2, 2, 2, 2]), pair_image=np.array([0, 1, 2, 3, 4, 4, 4, 4]))
    return view, features


def test_proxy_distance_hand_computed():
    view, features = _toy_view()
    # E[x0] over the 8 training examples = (1 - 1 + 3 + 1 + 4 * 4) / 8 = 2.5
    # caption means: 0, 2, 4 -> distances 2.5, 0.5, 1.5
    assert proxy_distances(features, view) == pytest.approx([2.5, 0.5, 1.5])
    report = proxy_report(features, view)
    assert report["auroc_duplicated_vs_ordinary"] == pytest.approx(0.5)  # 1.5 beats 0.5, loses to 2.5
    # ordinary examples 1, -1, 3, 1 (mean 1, total SS 8); caption means 0, 2: between SS 2 + 2 = 4
    assert explained_variance(features, view) == pytest.approx(0.5)


def test_ideal_guidance_norms_limit_and_hand_computed():
    view, features = _toy_view()
    # alpha_bar -> 0: the posterior is the duplication-weighted mean, the proxy distance
    assert ideal_guidance_norms(features, view, alpha_bar=1e-12, draws=3) == pytest.approx([2.5, 0.5, 1.5])
    a, x_t = 0.5, np.random.default_rng(7).standard_normal(1)[0]  # the draw the function makes with seed 7

    def posterior_mean(images, counts):
        x = np.array(images)
        w = np.array(counts) * np.exp((np.sqrt(a) * x_t * x - a * x**2 / 2) / (1 - a))
        return (w * x).sum() / w.sum()

    uncond = posterior_mean([1.0, -1.0, 3.0, 1.0, 4.0], [1, 1, 1, 1, 4])
    expected = [abs(posterior_mean([1.0, -1.0], [1, 1]) - uncond), abs(posterior_mean([3.0, 1.0], [1, 1]) - uncond),
                abs(4.0 - uncond)]
    assert ideal_guidance_norms(features, view, alpha_bar=a, draws=1, seed=7) == pytest.approx(expected)


@pytest.fixture
def one_thread():
    """torch on one thread for the test, then as before (set and left at 1, every later test of the session ran
    on one core)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gate_passes_on_a_small_sd_corpus_and_the_collapse_corpus_fails_in_pixels(one_thread):
    report = check_corpus(corpus_view("sd", SMALL), ssim_captions=20, roundtrip_images=16)
    assert report["gate"]["passed"] and report["latent"]["auroc_duplicated_vs_ordinary"] >= 0.95
    assert report["pixel"]["auroc_duplicated_vs_ordinary"] >= 0.95
    # ordinary captions vary across their images; copies of a duplicated caption are identical
    div = report["diversity_ssim"]
    assert div["generic"]["mean"] < 0.5 and div["duplicated"]["mean"] == pytest.approx(1.0)
    bal = report["balance"]
    assert bal["compared_with"] == "title" and bal["auroc_word_count"] == 0.5
    assert abs(bal["auroc_vocabulary_naive_bayes_loo"] - 0.5) < 0.2
    assert bal["signature_words_seen_in_other"] == 1.0
    # the shipped corpus: the pixel-space figure (0.60), far below the gate
    collapse = corpus_view("collapse")
    pix = proxy_report(pixel_features(collapse.images), collapse)
    assert pix["auroc_duplicated_vs_ordinary"] < 0.7


def test_balance_flags_a_vocabulary_give_away():
    view, _ = _toy_view()
    words = ["alpha beta", "gamma delta", "alpha gamma"] * 10 + ["zeta eta", "zeta theta"] * 5
    kinds = ["title"] * 30 + ["signature"] * 10
    give_away = CorpusView(name="toy", captions=words, kinds=kinds, families=["t"] * 40,
                           replication=np.array([1] * 30 + [4] * 10), images=view.images,
                           pair_item=np.arange(40), pair_image=np.zeros(40, dtype=np.int64))
    bal = balance_report(give_away)
    assert bal["auroc_vocabulary_naive_bayes_loo"] == 1.0 and bal["signature_words_seen_in_other"] == 0.0


def test_check_corpus_command(tmp_path, monkeypatch, capsys):
    import diffmem.zoo.gate as gate
    from diffmem.cli.main import main

    tiny = corpus_view("sd", TINY_SD)
    monkeypatch.setattr(gate, "corpus_view", lambda name: tiny)
    out = tmp_path / "gate.json"
    assert main(["zoo", "check-corpus", "--corpus", "sd", "--out", str(out)]) == 0
    printed, report = capsys.readouterr().out, json.loads(out.read_text())
    assert f"latent {report['latent']['auroc_duplicated_vs_ordinary']:.3f}" in printed
    assert report["corpus"] == "sd" and report["n_unique_images"] == len(tiny.images)
