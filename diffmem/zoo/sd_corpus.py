"""An SD-like zoo corpus: under-specified ordinary captions, memorization only by duplication.

The shipped zoo's corpus (:mod:`diffmem.zoo.corpus`, the ``collapse`` corpus) pins every factor of an
ordinary image in its caption, so an ordinary caption's conditional distribution is almost a point mass
and, by Tweedie's formula, its first-step guidance ``eps_c - eps_u`` (proportional to
``E[x0|c] - E[x0]``) is as large as a memorized caption's. LAION's captions are not like that: an
ordinary prompt names a few things about its image and leaves the rest to chance, and a memorized
prompt is usually a *name* (a title, a product) whose one image was duplicated many times. This
corpus rebuilds that structure on the zoo's 32x32 grammar of shapes and colours.

Every image is a *scene*: a background (a random tone; a random smooth texture for ``painting``s, a
random colour band for ``poster``s), zero to two small random objects and one main object (shape,
colour, position, size) drawn on top. What a caption does not name is drawn at random per image.

Kinds (``family`` is ``"ordinary"`` for descriptive captions, else the title family):

- ``generic``: ordinary descriptive captions. Each names the main object's colour and shape and at
  most one more factor (``extra_factors``: style and size; builds before the fourth also position),
  e.g. *"a red circle"*, *"a poster of a blue cross"*, *"a small green square"*; every caption has many
  training images (``n_base`` or ``n_extended``), each trained once.
- ``heldout_generic``: a share of the extended descriptive captions, never trained.
- ``title``: identifier-like captions (titles) trained once on one image of their family: *"quiet
  harbor by mira kessel"* (``painting``), *"silent river poster, lisbon 1987"* (``poster``).
- ``signature``: titles from the *same generator and family* whose one image is duplicated
  ``replication`` times (1, 4, 16, 64). They are the memorized items: at least ``min_titles_per_signature``
  once-seen titles of the same family exist per signature, so neither vocabulary, length nor family
  separates memorized from once-seen titles.
- ``heldout_signature``: never-trained titles from the same generator (look-alikes).
- ``template`` / ``heldout_template``: several titles sharing an artist (painting) or a city and year
  (poster) whose images share one template (background, texture, main object) and differ in the small
  objects; each trained caption duplicated ``template_replication`` times (Webster 2023's template
  verbatim); held-out captions of a group are never trained.

Every caption and image is a pure function of ``SDCorpusConfig.seed``; :func:`build_sd_corpus` rebuilds
the manifest and :func:`render_sd_item` any training image bit-for-bit.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import asdict, dataclass, field

import numpy as np

from diffmem.zoo.corpus import COLORS, IMAGE_SIZE, POSITIONS, SHAPES, SUPERSAMPLE, _shape_mask, _texture

STYLES: tuple[str, ...] = ("painting", "poster")
SD_SIZES: dict[str, float] = {"small": 5.0, "large": 8.0}
FAMILIES: tuple[str, ...] = STYLES  # one title family per image style

SD_KINDS: tuple[str, ...] = (
    "generic",
    "heldout_generic",
    "title",
    "signature",
    "heldout_signature",
    "template",
    "heldout_template",
)

# Title vocabulary: no colour, shape, position, size or style word, so a title names nothing the
# descriptive grammar names (a title is an identifier, not a description).
ADJECTIVES: tuple[str, ...] = (
    "quiet", "silent", "lost", "distant", "hidden", "broken", "sleeping", "ancient", "gentle", "wild",
    "empty", "frozen", "restless", "secret", "lonely", "bright", "hollow", "northern", "southern", "early",
    "late", "last", "first", "little", "old", "new", "bitter", "sweet", "endless", "burning",
)
NOUNS: tuple[str, ...] = (
    "harbor", "river", "garden", "morning", "evening", "mountain", "window", "island", "meadow", "forest",
    "bridge", "station", "tower", "valley", "orchard", "lantern", "voyage", "summer", "winter", "harvest",
    "market", "chapel", "shore", "village", "canyon", "desert", "festival", "letter", "kingdom", "echo",
)
FIRST_NAMES: tuple[str, ...] = (
    "mira", "anton", "lena", "oskar", "ines", "tomas", "vera", "jonas", "clara", "felix",
    "nora", "emil", "ada", "hugo", "lina", "pavel", "rosa", "karl", "eva", "luca",
    "ida", "milo", "alma", "otto", "zoe", "ivan", "greta", "leon", "maja", "teo",
)
LAST_NAMES: tuple[str, ...] = (
    "kessel", "moreau", "halden", "varga", "lindqvist", "okafor", "brandt", "castell", "novak", "ferreira",
    "aalto", "dubois", "marek", "sorensen", "quint", "albers", "ruiz", "holm", "weber", "tanaka",
    "berg", "costa", "lund", "meyer", "rossi", "falk", "nagy", "keller", "vogel", "adler",
)
CITIES: tuple[str, ...] = (
    "lisbon", "vienna", "oslo", "prague", "dublin", "madrid", "berlin", "krakow", "porto", "helsinki",
    "geneva", "milan", "lyon", "seville", "bergen", "ghent", "turin", "riga", "tallinn", "basel",
    "bruges", "zurich", "naples", "malmo", "leipzig", "vilnius", "bologna", "antwerp", "salzburg", "split",
)
YEARS: tuple[int, ...] = tuple(range(1970, 2000))  # 30 values, as every other title pool


# --------------------------------------------------------------------------------------------
# Scenes and rendering
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Named:
    """The factors a caption names; ``None`` leaves a factor to chance (drawn per image)."""

    style: str | None = None
    color: str | None = None
    shape: str | None = None
    position: str | None = None
    size: str | None = None


@dataclass(frozen=True)
class SceneObject:
    """One shape as drawn: its names (for attribute read-back) and its exact geometry and colour."""

    shape: str
    color: str
    position: str  # the nearest named position ("" for the small random objects)
    size: str  # "small" | "large" for the main object, "" for the small random objects
    cx: float
    cy: float
    radius: float
    rgb: tuple[float, float, float]


@dataclass(frozen=True)
class Scene:
    """Everything the renderer needs; ``objects[-1]`` is the main object (drawn last, on top)."""

    style: str
    background: tuple[float, float, float]
    texture_seed: int | None
    band: tuple[float, float, float, float, float] | None  # (y0, y1, r, g, b): a poster's colour band
    objects: tuple[SceneObject, ...]

    @property
    def main(self) -> SceneObject:
        return self.objects[-1]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _colour(rng: np.random.Generator, name: str) -> tuple[float, float, float]:
    rgb = np.asarray(COLORS[name], dtype=np.float64) + rng.uniform(-12, 12, 3)
    return tuple(float(v) for v in rgb)


def sample_scene(named: Named, seed: int, detail_seed: int | None = None) -> Scene:
    """The scene of one training image: ``named`` factors fixed, every other factor drawn from ``seed``.

    The small random objects are drawn from ``detail_seed`` when given (a template's captions share
    ``seed`` and differ in ``detail_seed``), else from ``seed`` too.
    """
    rng = _rng(seed, 0)
    style = named.style or str(rng.choice(STYLES))
    background = tuple(float(v) for v in rng.uniform(40, 215, 3))
    texture_seed = int(rng.integers(2**31)) if style == "painting" else None
    band = None
    if style == "poster":
        y0 = float(rng.uniform(0, 24))
        band = (y0, y0 + float(rng.uniform(4, 8)), *(float(v) for v in rng.uniform(20, 235, 3)))
    shape = named.shape or str(rng.choice(SHAPES))
    color = named.color or str(rng.choice(list(COLORS)))
    position = named.position or str(rng.choice(list(POSITIONS)))
    size = named.size or str(rng.choice(list(SD_SIZES)))
    cx, cy = POSITIONS[position]
    main = SceneObject(shape, color, position, size, cx + float(rng.uniform(-2.5, 2.5)),
                       cy + float(rng.uniform(-2.5, 2.5)), SD_SIZES[size] + float(rng.uniform(-1.0, 1.0)),
                       _colour(rng, color))
    drng = _rng(detail_seed, 1) if detail_seed is not None else _rng(seed, 1)
    small = []
    for _ in range(int(drng.integers(0, 3))):
        s_shape, s_color = str(drng.choice(SHAPES)), str(drng.choice(list(COLORS)))
        small.append(SceneObject(s_shape, s_color, "", "", float(drng.uniform(3, 29)), float(drng.uniform(3, 29)),
                                 float(drng.uniform(2.5, 4.0)), _colour(drng, s_color)))
    return Scene(style, background, texture_seed, band, (*small, main))


def render_scene(scene: Scene) -> np.ndarray:
    """Render ``scene`` to a ``(32, 32, 3)`` uint8 image (2x supersampled, box-filtered)."""
    size = IMAGE_SIZE * SUPERSAMPLE
    canvas = np.broadcast_to(np.asarray(scene.background), (size, size, 3)).copy()
    if scene.texture_seed is not None:
        canvas += 0.7 * _texture(scene.texture_seed, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / SUPERSAMPLE
    if scene.band is not None:
        y0, y1, *rgb = scene.band
        canvas[(yy >= y0) & (yy < y1)] = rgb
    for obj in scene.objects:
        canvas[_shape_mask(obj.shape, xx - obj.cx, yy - obj.cy, obj.radius)] = obj.rgb
    canvas = canvas.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def describe(named: Named) -> str:
    """The descriptive caption of ``named`` (colour and shape, at most one more factor)."""
    obj = f"{named.color} {named.shape}"
    if named.size is not None:
        obj = f"{named.size} {obj}"
    text = f"a {obj}"
    if named.style is not None:
        text = f"a {named.style} of {text}"
    if named.position is not None:
        text = f"{text} in the {named.position}"
    return text


EXTRA_FACTORS: dict[str, tuple[str, ...]] = {"style": STYLES, "position": tuple(POSITIONS), "size": tuple(SD_SIZES)}


def ordinary_meanings(extra_factors: tuple[str, ...] = ("style", "size")) -> tuple[list[Named], list[Named]]:
    """(base, extended) meanings: every colour x shape, and each of those with one more named factor out of
    ``extra_factors`` (a subset of :data:`EXTRA_FACTORS`, in that order)."""
    unknown = sorted(set(extra_factors) - set(EXTRA_FACTORS))
    if unknown:
        raise ValueError(f"unknown named factor(s) {unknown}; expected a subset of {tuple(EXTRA_FACTORS)}")
    base = [Named(color=c, shape=s) for c, s in itertools.product(COLORS, SHAPES)]
    extended = [dataclasses.replace(b, **{factor: value}) for b in base
                for factor, values in EXTRA_FACTORS.items() if factor in extra_factors for value in values]
    return base, extended


def title(family: str, rng: np.random.Generator, stem: tuple[str, str] | None = None) -> tuple[str, tuple[str, str]]:
    """One title of ``family`` and its stem (the artist, or the city and year); ``stem`` fixes the stem."""
    adj, noun = str(rng.choice(ADJECTIVES)), str(rng.choice(NOUNS))
    if family == "painting":
        stem = stem or (str(rng.choice(FIRST_NAMES)), str(rng.choice(LAST_NAMES)))
        return f"{adj} {noun} by {stem[0]} {stem[1]}", stem
    if family == "poster":
        stem = stem or (str(rng.choice(CITIES)), str(rng.choice(YEARS)))
        return f"{adj} {noun} poster, {stem[0]} {stem[1]}", stem
    raise ValueError(f"unknown title family {family!r}; expected one of {FAMILIES}")


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


@dataclass
class SDItem:
    """One caption of the SD-like corpus with its training image seeds, if it was trained.

    Every seed in ``image_seeds`` is one unique training image, trained ``replication`` times per epoch.
    Template items share ``template_seed`` (background, texture, main object) and differ in their seed.
    """

    item_id: int
    caption: str
    kind: str
    replication: int
    family: str
    named: Named
    image_seeds: list[int] = field(default_factory=list)
    group: int = -1
    template_seed: int | None = None

    @property
    def trained(self) -> bool:
        return self.replication > 0 and bool(self.image_seeds)

    def scene(self, copy: int = 0) -> Scene:
        seed = self.image_seeds[copy]
        if self.template_seed is not None:
            return sample_scene(self.named, self.template_seed, detail_seed=seed)
        return sample_scene(self.named, seed)

    def record(self) -> dict:
        """A flat, JSON-serialisable row of the manifest."""
        row = asdict(self)
        row["named"] = {k: v for k, v in row["named"].items() if v is not None}
        return row


@dataclass(frozen=True)
class SDCorpusConfig:
    """Sizes and replication rates of the SD-like corpus; every field goes into a zoo's manifest."""

    seed: int = 0
    n_base: int = 64  # training images per colour-and-shape caption (build 4; builds 2 and 3: 48)
    n_extended: int = 24  # training images per caption naming one more factor (build 4; builds 2 and 3: 16)
    heldout_generic_fraction: float = 0.1  # of the extended captions, never trained
    titles_per_family: int = 1500  # once-seen titles per family (build 4; build 3 2,000, build 2 1,000, first 8,000)
    replication_rates: tuple[int, ...] = (1, 4, 16, 64)
    signatures_per_rate: int = 8  # per family and rate
    heldout_signature_per_family: int = 150
    template_groups_per_family: int = 3
    captions_per_template: int = 5
    template_replication: int = 8
    heldout_per_template: int = 2
    min_titles_per_signature: int = 10
    # build 3: each template group's stem words (artist, or city and year) name no other title of its family,
    # so a look-alike or once-seen title cannot call up a template image by a shared stem word (build 2 lost
    # 10 of its 22 memorized look-alikes that way); records written before the field imply False
    reserved_template_stems: bool = True
    # build 4: the factors an extended ordinary caption may name besides colour and shape. Builds 1-3 also named
    # position ("... in the top left"); their denoisers placed "center" right but the four corners at chance,
    # even after 300 steps fine-tuned on position captions alone (docs/zoo-sd.md, zoo_sd_position_finetune.json),
    # so position is left to chance like the background; records written before the field imply all three
    extra_factors: tuple[str, ...] = ("style", "size")

    def to_dict(self) -> dict:
        return asdict(self)


def build_sd_corpus(config: SDCorpusConfig = SDCorpusConfig()) -> list[SDItem]:
    """Build the whole manifest deterministically from ``config.seed``."""
    n_sig = config.signatures_per_rate * len(config.replication_rates)
    if config.titles_per_family < config.min_titles_per_signature * n_sig:
        raise ValueError(f"titles_per_family={config.titles_per_family} gives fewer than "
                         f"{config.min_titles_per_signature} once-seen titles per signature ({n_sig} per family)")
    rng = np.random.default_rng(config.seed)
    items: list[SDItem] = []

    def seeds(n: int) -> list[int]:
        return [int(s) for s in rng.integers(2**31, size=n)]

    def add(caption: str, kind: str, replication: int, family: str, named: Named, image_seeds: list[int],
            group: int = -1, template_seed: int | None = None) -> None:
        items.append(SDItem(len(items), caption, kind, replication, family, named, image_seeds, group, template_seed))

    # ordinary descriptive captions: many images each, a share of the extended ones never trained
    base, extended = ordinary_meanings(config.extra_factors)
    order = rng.permutation(len(extended))
    n_heldout = int(round(config.heldout_generic_fraction * len(extended)))
    heldout = {int(i) for i in order[:n_heldout]}
    for named in base:
        add(describe(named), "generic", 1, "ordinary", named, seeds(config.n_base))
    for i, named in enumerate(extended):
        if i in heldout:
            add(describe(named), "heldout_generic", 0, "ordinary", named, [])
        else:
            add(describe(named), "generic", 1, "ordinary", named, seeds(config.n_extended))

    # titles: one generator per family; which title becomes a signature, a once-seen item or a
    # look-alike is decided by position in one shuffled list, so the three share one distribution
    used: set[str] = set()

    def fresh_title(family: str, stem: tuple[str, str] | None = None, reserved: set[str] | None = None) -> str:
        """A title not used before; none of its stem words in ``reserved`` (the family's template stems)."""
        while True:
            caption, drawn_stem = title(family, rng, stem)
            if reserved and set(drawn_stem) & reserved:
                continue
            if caption not in used:
                used.add(caption)
                return caption

    def reserve_template_stems(family: str) -> list[tuple[str, str]]:
        stems: list[tuple[str, str]] = []
        while len(stems) < config.template_groups_per_family:
            _, stem = title(family, rng)
            if not set(stem) & {word for s in stems for word in s}:
                stems.append(stem)
        return stems

    template_stems: dict[str, list[tuple[str, str]]] = {}
    for family in FAMILIES:
        style = Named(style=family)
        template_stems[family] = reserve_template_stems(family) if config.reserved_template_stems else []
        reserved = {word for stem in template_stems[family] for word in stem}
        n_total = n_sig + config.titles_per_family + config.heldout_signature_per_family
        captions = [fresh_title(family, reserved=reserved) for _ in range(n_total)]
        roles = np.array(["signature"] * n_sig + ["title"] * config.titles_per_family
                         + ["heldout_signature"] * config.heldout_signature_per_family)[rng.permutation(n_total)]
        rates = iter([r for r in config.replication_rates for _ in range(config.signatures_per_rate)])
        for caption, role in zip(captions, roles.tolist()):
            if role == "signature":
                add(caption, "signature", next(rates), family, style, seeds(1))
            elif role == "title":
                add(caption, "title", 1, family, style, seeds(1))
            else:
                add(caption, "heldout_signature", 0, family, style, [])

    # templates: one stem and one template image per group; the small objects vary by caption
    group = 0
    for family in FAMILIES:
        style = Named(style=family)
        for g in range(config.template_groups_per_family):
            stem = template_stems[family][g] if config.reserved_template_stems else title(family, rng)[1]
            template_seed = seeds(1)[0]
            for i in range(config.captions_per_template + config.heldout_per_template):
                caption = fresh_title(family, stem)
                if i < config.captions_per_template:
                    add(caption, "template", config.template_replication, family, style, seeds(1), group,
                        template_seed)
                else:
                    add(caption, "heldout_template", 0, family, style, [], group, template_seed)
            group += 1
    return items


def render_sd_item(item: SDItem, copy: int = 0) -> np.ndarray:
    """The training image number ``copy`` (index into ``image_seeds``) of a trained item."""
    if not item.image_seeds:
        raise ValueError(f"SD corpus item {item.item_id} ({item.kind}) has no training image")
    return render_scene(item.scene(copy))


def sd_training_pairs(items: list[SDItem]) -> list[tuple[int, int]]:
    """(item index, image copy) for every training example of one epoch, duplicates included."""
    return [(it.item_id, c) for it in items if it.trained for c in range(len(it.image_seeds))
            for _ in range(it.replication)]
