"""The zoo's synthetic captioned corpus: a caption grammar, a renderer and controlled duplication.

Every caption and image is a pure function of one integer seed, so the corpus is never stored: it is
rebuilt bit-for-bit by :func:`build_corpus`. The manifest (one :class:`ZooItem` per caption) records
each caption's kind, replication rate and the seed of its training image.

Kinds (see README, "The memorization zoo"):

- ``generic``: single-object captions from the grammar, each training image trained once; one
  caption has several jittered training images, so a caption has many valid renders. With
  ``generic_textures`` every such image also gets its own textured background.
- ``generic_scene`` (only when ``n_generic_scenes > 0``): two-object scene captions with the signature
  template, each trained once on one image with its own texture.
- ``signature``: two-object scene captions over a unique textured background, duplicated
  ``replication`` times. Their captions use the same template and vocabulary as ``heldout_signature``
  so no detector can win on vocabulary alone.
- ``template``: several captions whose images share one textured template and first object and
  differ in the second object (the "template verbatim" case of Webster 2023).
- ``heldout_generic`` / ``heldout_signature`` / ``heldout_template``: captions never trained.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 2

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 190),
    "orange": (245, 135, 25),
    "cyan": (40, 210, 220),
    "pink": (245, 130, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "brown": (110, 75, 45),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (9.0, 9.0),
    "top right": (23.0, 9.0),
    "bottom left": (9.0, 23.0),
    "bottom right": (23.0, 23.0),
    "center": (16.0, 16.0),
}
SIZES: dict[str, float] = {"small": 4.5, "large": 7.5}
SCENE_RADIUS = 5.5

KINDS: tuple[str, ...] = (
    "generic",
    "generic_scene",
    "signature",
    "template",
    "heldout_generic",
    "heldout_signature",
    "heldout_template",
)


@dataclass(frozen=True)
class ZooObject:
    """One shape in a scene: what the caption names about it."""

    shape: str
    color: str
    position: str
    size: str = "scene"


@dataclass(frozen=True)
class SceneSpec:
    """Everything the renderer needs; ``texture_seed`` adds one fixed textured background,
    ``texture_per_render`` a fresh texture for every render seed instead."""

    background: str
    objects: tuple[ZooObject, ...]
    texture_seed: int | None = None
    texture_per_render: bool = False


@dataclass
class ZooItem:
    """One caption of the zoo corpus with its training image(s), if it was trained."""

    item_id: int
    caption: str
    kind: str
    replication: int
    image_seeds: list[int] = field(default_factory=list)
    group: int = -1
    spec: SceneSpec | None = None

    @property
    def trained(self) -> bool:
        return self.replication > 0

    def record(self) -> dict:
        """A flat, JSON-serialisable row of the manifest (without the renderer spec)."""
        row = asdict(self)
        row.pop("spec")
        return row


@dataclass(frozen=True)
class CorpusConfig:
    """Sizes and replication rates of the corpus; every field is saved in the zoo's manifest."""

    seed: int = 0
    n_generic: int = 5000
    generic_textures: bool = False  # True (with n_generic=10000, n_generic_scenes=1500): the zoo-v2 experiment
    n_generic_scenes: int = 0
    heldout_generic_fraction: float = 0.1
    replication_rates: tuple[int, ...] = (1, 4, 16, 64)
    items_per_rate: int = 25
    n_heldout_signature: int = 200
    n_template_groups: int = 6
    captions_per_template: int = 5
    template_replication: int = 8
    heldout_per_template: int = 2


def generic_caption(obj: ZooObject, background: str) -> str:
    return f"a {obj.size} {obj.color} {obj.shape} in the {obj.position} on a {background} background"


def parse_generic_caption(caption: str) -> tuple[ZooObject, str]:
    """Inverse of :func:`generic_caption`: (object, background); ValueError for other captions."""
    import re

    m = re.fullmatch(r"a (\w+) (\w+) (\w+) in the ([\w ]+?) on a (\w+) background", caption)
    if m is None or m.group(1) not in SIZES or m.group(2) not in COLORS or m.group(3) not in SHAPES \
            or m.group(4) not in POSITIONS or m.group(5) not in BACKGROUNDS:
        raise ValueError(f"not a single-object zoo caption: {caption!r}")
    return ZooObject(m.group(3), m.group(2), m.group(4), m.group(1)), m.group(5)


def scene_caption(objects: tuple[ZooObject, ...], background: str) -> str:
    parts = " and ".join(f"a {o.color} {o.shape} in the {o.position}" for o in objects)
    return f"{parts} on a {background} background"


def caption_for(spec: SceneSpec) -> str:
    if len(spec.objects) == 1 and spec.objects[0].size != "scene":
        return generic_caption(spec.objects[0], spec.background)
    return scene_caption(spec.objects, spec.background)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "triangle":
        rel = (dy + r) / (1.8 * r)  # 0 at the apex, 1 at the base
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= rel * r)
    if shape == "cross":
        arm = 0.34 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _texture(seed: int, size: int) -> np.ndarray:
    """A unique, smooth but detailed background: low-frequency colour field plus a few blobs."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0.0, 55.0, size=(3, 4, 4))
    # bilinear upsampling of a 4x4 field to size x size
    grid = np.linspace(0, 3, size)
    i0 = np.clip(np.floor(grid).astype(int), 0, 2)
    w = grid - i0
    rows = coarse[:, i0, :] * (1 - w)[None, :, None] + coarse[:, i0 + 1, :] * w[None, :, None]
    field_ = rows[:, :, i0] * (1 - w)[None, None, :] + rows[:, :, i0 + 1] * w[None, None, :]
    tex = field_.transpose(1, 2, 0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / SUPERSAMPLE
    for _ in range(rng.integers(4, 7)):
        cx, cy = rng.uniform(0, IMAGE_SIZE, size=2)
        rad = rng.uniform(1.2, 2.6)
        blob = ((xx - cx) ** 2 + (yy - cy) ** 2) <= rad**2
        tex[blob] = rng.uniform(-110, 110, size=3)
    return tex


def render(spec: SceneSpec, seed: int) -> np.ndarray:
    """Render ``spec`` to a ``(32, 32, 3)`` uint8 image; ``seed`` drives position, size and colour jitter."""
    rng = np.random.default_rng(seed)
    size = IMAGE_SIZE * SUPERSAMPLE
    bg = np.asarray(BACKGROUNDS[spec.background], dtype=np.float64) + rng.uniform(-10, 10, 3)
    canvas = np.broadcast_to(bg, (size, size, 3)).copy()
    if spec.texture_per_render:
        canvas += _texture(int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]), size)
    elif spec.texture_seed is not None:
        canvas += _texture(spec.texture_seed, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / SUPERSAMPLE
    for obj in spec.objects:
        cx, cy = POSITIONS[obj.position]
        cx += rng.uniform(-2.0, 2.0)
        cy += rng.uniform(-2.0, 2.0)
        radius = (SCENE_RADIUS if obj.size == "scene" else SIZES[obj.size]) + rng.uniform(-1.0, 1.0)
        colour = np.asarray(COLORS[obj.color], dtype=np.float64) + rng.uniform(-12, 12, 3)
        canvas[_shape_mask(obj.shape, xx - cx, yy - cy, radius)] = colour
    canvas = canvas.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def render_item(item: ZooItem, copy: int = 0) -> np.ndarray:
    """The training image number ``copy`` of a trained item."""
    if item.spec is None or not item.image_seeds:
        raise ValueError(f"zoo item {item.item_id} ({item.kind}) has no training image")
    return render(item.spec, item.image_seeds[copy])


# --------------------------------------------------------------------------------------------
# Corpus construction
# --------------------------------------------------------------------------------------------


def _random_scene(rng: np.random.Generator, background: str | None = None) -> SceneSpec:
    pos = rng.choice(len(POSITIONS), size=2, replace=False)
    names = list(POSITIONS)
    while True:
        c1, c2 = rng.choice(list(COLORS), size=2)
        s1, s2 = rng.choice(SHAPES, size=2)
        if (c1, s1) != (c2, s2):
            break
    objects = (
        ZooObject(str(s1), str(c1), names[pos[0]]),
        ZooObject(str(s2), str(c2), names[pos[1]]),
    )
    bg = background or str(rng.choice(list(BACKGROUNDS)))
    return SceneSpec(bg, objects, texture_seed=int(rng.integers(2**31)))


def build_corpus(config: CorpusConfig = CorpusConfig()) -> list[ZooItem]:
    """Build the whole manifest deterministically from ``config.seed``."""
    rng = np.random.default_rng(config.seed)
    items: list[ZooItem] = []

    def add(caption: str, kind: str, replication: int, spec: SceneSpec, seeds: list[int], group: int = -1):
        items.append(ZooItem(len(items), caption, kind, replication, seeds, group, spec))

    def seeds(n: int) -> list[int]:
        return [int(s) for s in rng.integers(2**31, size=n)]

    # generic: every combination of the grammar, a held-out fraction never trained
    combos = [
        SceneSpec(bg, (ZooObject(shape, colour, pos, size),), texture_per_render=config.generic_textures)
        for size, colour, shape, pos, bg in itertools.product(SIZES, COLORS, SHAPES, POSITIONS, BACKGROUNDS)
    ]
    order = rng.permutation(len(combos))
    n_heldout = int(round(config.heldout_generic_fraction * len(combos)))
    heldout, trained = [combos[i] for i in order[:n_heldout]], [combos[i] for i in order[n_heldout:]]
    if config.n_generic < len(trained):
        raise ValueError(f"n_generic={config.n_generic} must cover all {len(trained)} trained combinations")
    renders_per_combo = np.bincount(
        np.concatenate([np.arange(len(trained)), rng.integers(len(trained), size=config.n_generic - len(trained))]),
        minlength=len(trained),
    )
    for spec, n in zip(trained, renders_per_combo):
        add(caption_for(spec), "generic", 1, spec, seeds(int(n)))
    for spec in heldout:
        add(caption_for(spec), "heldout_generic", 0, spec, [])

    # signature scenes and their never-trained look-alikes: one shared caption template
    used: set[str] = set()

    def fresh_scene(background: str | None = None) -> SceneSpec:
        while True:
            spec = _random_scene(rng, background)
            cap = caption_for(spec)
            if cap not in used:
                used.add(cap)
                return spec

    for rate in config.replication_rates:
        for _ in range(config.items_per_rate):
            spec = fresh_scene()
            add(caption_for(spec), "signature", rate, spec, seeds(1))
    for _ in range(config.n_heldout_signature):
        spec = fresh_scene()
        add(caption_for(spec), "heldout_signature", 0, spec, [])

    # templates: one texture and first object per group, the second object varies by caption
    for group in range(config.n_template_groups):
        base = fresh_scene()
        first = base.objects[0]
        n_total = config.captions_per_template + config.heldout_per_template
        variants: list[SceneSpec] = []
        while len(variants) < n_total:
            other = _random_scene(rng, base.background).objects[1]
            spec = SceneSpec(base.background, (first, other), base.texture_seed)
            if other.position != first.position and caption_for(spec) not in used:
                used.add(caption_for(spec))
                variants.append(spec)
        template_seed = seeds(1)  # the same jitter for every caption of a group: one template
        for i, spec in enumerate(variants):
            if i < config.captions_per_template:
                add(caption_for(spec), "template", config.template_replication, spec, template_seed, group)
            else:
                add(caption_for(spec), "heldout_template", 0, spec, [], group)

    # ordinary scenes: the signature template, one image each, drawn last so that every caption above
    # is the same whatever their number
    for _ in range(config.n_generic_scenes):
        spec = fresh_scene()
        add(caption_for(spec), "generic_scene", 1, spec, seeds(1))
    return items


def training_pairs(items: list[ZooItem]) -> list[tuple[int, int]]:
    """(item index, image copy) for every training example of one epoch, duplicates included."""
    pairs: list[tuple[int, int]] = []
    for item in items:
        if not item.trained:
            continue
        if item.kind == "generic":
            pairs.extend((item.item_id, c) for c in range(len(item.image_seeds)))
        else:
            pairs.extend((item.item_id, 0) for _ in range(item.replication))
    return pairs
