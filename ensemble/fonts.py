"""A many-class image set rendered from fonts: each class a character, each image one font's
drawing of it, white on black like MNIST, and the fonts split by design so that the validation
and test images come from designs no model saw in training.

    python -m ensemble.fonts --out DIR [--fonts DIR ...] [--chars han] [--classes 1000]
                             [--size 32] [--per-font 5] [--seed 0] [--val-families 3]
                             [--test-families 5]

writes DIR/fonts.npz (x_train, y_train, x_val, y_val, x_test, y_test: uint8 N x H x W and int64
labels; classes: the characters) for `data.npz`, and DIR/manifest.json (every face with its file's
sha256, family and split; every face left out and why; the code points; the arguments).

How it is made, in order (one function each):

1. Faces (`read_faces`): every face of every .ttf/.otf/.ttc under the given folders, its Unicode
   cmap and family name read with fontTools; a file met twice (same sha256) counts once.
2. Design families (`design_of`): the name table's typographic family (nameID 16, else 1) with
   region, weight, width and slope words removed ("Noto Sans CJK JP Bold" and "DejaVu Sans
   Condensed Oblique" become "Noto Sans CJK" and "DejaVu Sans"), then `DERIVED`, a table of
   designs whose names hide that they are one (IPAex and Takao are IPA's; UMing extends
   Arphic's Mingti and Sungti; WenKai extends Klee One; Micro Hei's Han are Droid's; the
   "Mono" of a CJK font changes its Latin only). "Mono" is not removed from other names:
   DejaVu Sans Mono is a design of its own. A split never divides a design family.
3. Faces kept (`choose_faces`): largest repertoire first, a face joins when the characters every
   kept face draws stay at least `classes` many; a face that would shrink them further is left
   out, with its reason on stderr. "Draws" (`drawn`) means in its cmap, not blank, and not its
   .notdef glyph (a code point absent from the cmap shows .notdef): fonts map code points to
   boxes, and some glyphs are empty or refused by FreeType.
4. Look-alike faces (`tidy_faces`): every face draws a sample of those characters, small and
   unaugmented. Two faces of one family drawing >= 90% of them alike are one drawing (IPA
   Gothic and IPA P Gothic differ in Latin widths only): the later is left out. Faces of two
   families drawing >= 50% alike are one design under two names: the families are merged, and
   said so (names miss some derivatives; the pictures do not).
5. Classes (`choose_classes`): the characters every kept face draws, in a seeded random order,
   the first `classes` of them that are not look-alikes of one before (alike in more than half
   the faces, as Latin A, Greek Alpha and Cyrillic A are), sorted.
6. Splits (`split_designs`): a seeded choice of `val_families` families for validation and
   `test_families` for test; every other family trains.
7. Images (`render_images`): each (class, face) drawn `per_font` times (`eval_per_font` for
   validation and test faces) at SUPERSAMPLE x the size, centred by its ink's bounding box and
   scaled to fit inside a margin, thinned or thickened, turned, sheared, scaled, shifted and
   bent a little (an elastic field), then averaged down to the size (antialiased).

Reproducible: each (face, class) draws its variations from its own generator seeded by the
master seed, the face file's sha256 and the code point, so the bytes do not depend on what else
is built, on the order work is done or on the number of worker processes. The same fonts,
Pillow and FreeType give the same fonts.npz, byte for byte (its zip entries carry no clock).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import multiprocessing
import re
import sys
import time
import unicodedata
import zipfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from ensemble.errors import DataError

FONT_DIRS = ("/usr/share/fonts",)  # where Debian's font packages put their files
SUFFIXES = {".ttf", ".otf", ".ttc"}
REPERTOIRES = {  # code point ranges the classes come from (less the EXCLUDED categories)
    "han": ((0x4E00, 0x9FFF),),  # CJK Unified Ideographs: thousands every CJK font shares
    "letters": ((0x41, 0x5A), (0x61, 0x7A), (0x391, 0x3A9), (0x3B1, 0x3C9), (0x410, 0x44F)),
    "all": ((0x21, 0x10FFFF),),  # anything; "letters": the Latin, Greek, Cyrillic alphabets
}
EXCLUDED = ("Z", "C", "M")  # Unicode categories never a class: spaces, controls, combining marks
DERIVED = (  # (pattern on the family name, design): one design whose names do not say so
    (r"^(IPA|IPAex|Takao) ?P?Gothic", "IPA Gothic"),  # IPAex revises IPA; Takao forks it;
    (r"^(IPA|IPAex|Takao) ?P?Mincho", "IPA Mincho"),  # P: proportional Latin, the same Han
    (r"^(AR PL (UMing|Mingti2L|SungtiL)|BabelStone Han)", "AR PL Ming"),  # UMing extends the
    (r"^AR PL (UKai|KaitiM)", "AR PL Kai"),  # Big5 and GB fonts, BabelStone Han builds on them
    (r"^(WenQuanYi Micro Hei|Droid Sans Fallback)", "Droid Sans Fallback"),  # Micro Hei's Han
    (r"^(LXGW WenKai|Klee One)", "Klee One"),  # WenKai extends Klee One
    (r"^(Noto Sans (Mono )?CJK|Source Han Sans)", "Noto Sans CJK"),  # Google's and Adobe's
    (r"^(Noto Serif CJK|Source Han Serif)", "Noto Serif CJK"),  # names of one design
    (r"^WenQuanYi Zen Hei", "WenQuanYi Zen Hei"),  # Mono, Sharp: the same Han
    (r"^HanaMin", "HanaMin"), (r"^SetoFont", "SetoFont"),  # HanaMin A and B: one font; -ex
    (r"^TW-Kai", "TW-Kai"), (r"^TW-Sung", "TW-Sung"),  # -Ext-B, -Plus: the same
    (r"^Ume (P |UI |Hy )?Gothic", "Ume Gothic"), (r"^Ume (P )?Mincho", "Ume Mincho"),
    (r"^VL P?Gothic", "VL Gothic"), (r"^BIZ UDP?Gothic", "BIZ UD Gothic"),
    (r"^BIZ UDP?Mincho", "BIZ UD Mincho"),
    (r"^cm(r|b|bx|ti|mi|sl)\d+$", "Computer Modern Roman"),  # matplotlib's BaKoMa TeX fonts
    (r"^cmss\d+$", "Computer Modern Sans"), (r"^cmtt\d+$", "Computer Modern Typewriter"),
)
STYLE_WORDS = re.compile(  # region, weight, width and slope words: not part of a design's name
    r"\b(JP|KR|SC|TC|HK|CN|TW|MBE|GB|Big5|Thin|Hairline|(Extra|Ultra|Semi|Demi)?(Light|Bold)|"
    r"Book|Regular|Normal|Medium|Black|Heavy|W\d|(Semi|Extra|Ultra)?(Condensed|Expanded)|Narrow|"
    r"Italic|Oblique|Display)\b", re.IGNORECASE)
MISSING = (0x10FFFD, 0xFFFFD, 0xFFFF)  # private use and non-characters: shown as .notdef
INK = 32  # of 255: fainter pixels are antialiasing dust, not ink (for "blank" and cropping)
CHECK_PX = 32  # font size at which "draws it" is judged: big enough to show any stroke
LOOK = 16  # pixels a side of the small unaugmented drawings that look-alikes are judged on
ALIKE = 0.06  # RMS difference (of 1) under which two such drawings are the same drawing
SAME_FACE, SAME_DESIGN = 0.9, 0.5  # shares of classes drawn alike: one drawing, one design
SPARE = 50  # characters drawn beyond those still needed, in case some are look-alikes
SUPERSAMPLE = 4  # drawn at 4x the size, then averaged down: antialiased, strokes thin as 1/4 px
MARGIN = 0.1  # of the side, around the ink's box (MNIST: a 20 px box in 28 px)
ROTATE, SHEAR = 8.0, 0.15  # degrees, and x += shear * y: a slant of about 8.5 degrees
SCALE, SHIFT = (0.85, 1.0), 0.06  # of the fitted glyph; of the side: the margin absorbs both
ELASTIC, CELLS = 0.5, 4  # output pixels (sd) each corner of a 4 x 4 grid of cells moves by
STROKES = (-1, 0, 1)  # supersampled pixels the ink is eroded (-) or dilated (+) by: +-1/4 px
THIN = 0.6  # share of its ink a glyph must keep to be eroded: Mincho hairlines would vanish
PROCESSES = 2  # worker processes (fork) for drawing: this machine's cores
CHUNK = 50  # characters of one face per job


@dataclass(frozen=True)
class Recipe:
    """What to build; every field is in the manifest."""
    chars: str = "han"  # a REPERTOIRES key: Han is the repertoire deep enough for 1000 classes
    classes: int = 1000  # issue 22's many-class target; fewer if fewer are drawn by every face
    size: int = 32  # pixels a side: CIFAR's, enough for a Han character's strokes
    per_font: int = 5  # images of each (class, training face)
    eval_per_font: int = 2  # of each (class, validation or test face): they only measure
    seed: int = 0
    val_families: int = 3  # design families whose faces are validation images only
    test_families: int = 5  # and test images only: unseen designs measure generalisation

    def __post_init__(self):
        checks = ((self.chars in REPERTOIRES, "chars", f"one of {', '.join(REPERTOIRES)}"),
                  (self.classes >= 2, "classes", "at least 2"),
                  (self.size >= 8, "size", "at least 8 pixels"),
                  (self.per_font >= 1, "per_font", "at least 1"),
                  (self.eval_per_font >= 1, "eval_per_font", "at least 1"),
                  (self.val_families >= 0, "val_families", "at least 0"),
                  (self.test_families >= 1, "test_families", "at least 1"))
        for ok, name, want in checks:
            if not ok:
                raise DataError(f"fonts: {name} must be {want}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Face:
    """One face of a font file: `index` is its place in a .ttc collection (0 otherwise)."""
    path: Path
    index: int
    name: str  # the name table's family
    design: str  # the design family it is split by
    sha256: str
    missing: int | None  # a code point outside its cmap (draws .notdef); None if it maps all

    @property
    def label(self) -> str:
        return f"{self.path.name}#{self.index}"

    @property
    def key(self) -> tuple[str, int]:  # what a worker process needs to open it
        return str(self.path), self.index


# ---------------------------------------------------------------- faces and families -----------
def find_fonts(places=FONT_DIRS) -> list[Path]:
    """Font files (.ttf, .otf, .ttc) under the given folders, or the given files, sorted."""
    found = set()
    for place in map(Path, places):
        files = place.rglob("*") if place.is_dir() else [place]
        found.update(p.resolve() for p in files if p.suffix.lower() in SUFFIXES and p.is_file())
    if not found:
        raise DataError(f"fonts: no .ttf, .otf or .ttc file under {', '.join(map(str, places))}")
    return sorted(found)


def matplotlib_fonts() -> list[Path]:
    """The fonts matplotlib ships that draw letters as what their code points say: DejaVu,
    STIXGeneral and Computer Modern text faces. Not LastResort (it maps every code point to a
    box), nor STIX's size and non-Unicode faces or cmex10/cmsy10 (symbols under letters' codes)."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    wanted = ("DejaVu*.ttf", "STIXGeneral*.ttf", "cm[rb]10.ttf", "cmss10.ttf", "cmtt10.ttf",
              "cmti10.ttf", "cmmi10.ttf")
    return sorted(p for pattern in wanted for p in folder.glob(pattern))


def design_of(family: str) -> str:
    """The design family a face belongs to, from its name table's family (module docstring)."""
    for pattern, design in DERIVED:
        if re.search(pattern, family, re.IGNORECASE):
            return design
    return " ".join(STYLE_WORDS.sub(" ", family).split()) or family


def read_faces(paths, chars: str) -> tuple[dict[Face, set[int]], list[dict]]:
    """Every face of the files, with the code points of `chars` in its cmap; and the files
    left out (unreadable, or a copy of a file already read), with reasons."""
    from fontTools.ttLib import TTCollection, TTFont

    faces, dropped, seen = {}, [], {}
    for path in map(Path, paths):
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if sha in seen:
            dropped.append(_left_out(path, 0, "", f"the same file as {seen[sha]}"))
            continue
        seen[sha] = path.name
        try:
            fonts = TTCollection(io.BytesIO(data), lazy=True).fonts \
                if path.suffix.lower() == ".ttc" else [TTFont(io.BytesIO(data), lazy=True)]
            for index, font in enumerate(fonts):
                names, cmap = font["name"], font.getBestCmap() or {}
                family = names.getDebugName(16) or names.getDebugName(1) or path.stem
                missing = next((p for p in MISSING if p not in cmap), None)
                face = Face(path, index, family, design_of(family), sha, missing)
                faces[face] = {p for p in cmap if _wanted(p, chars)}
        except Exception as err:  # a damaged font: fontTools raises many kinds of error
            dropped.append(_left_out(path, 0, "", f"fontTools cannot read it ({err})"))
    return faces, dropped


def _wanted(point: int, chars: str) -> bool:
    return any(lo <= point <= hi for lo, hi in REPERTOIRES[chars]) and \
        not unicodedata.category(chr(point)).startswith(EXCLUDED)


def _left_out(path: Path, index: int, family: str, reason: str) -> dict:
    return {"file": path.name, "path": str(path), "face": index, "name": family,
            "reason": reason}


# ---------------------------------------------------------------- drawing one glyph -------------
@functools.lru_cache(maxsize=64)
def _font(path: str, index: int, px: int):
    from PIL import ImageFont

    # BASIC layout: one code point, one glyph, no shaping or font fallback between them
    return ImageFont.truetype(path, px, index=index, layout_engine=ImageFont.Layout.BASIC)


def ink(font, char: str) -> np.ndarray:
    """The glyph of `char`, uint8 (h, w), cropped to its ink; (0, 0) when nothing shows."""
    from PIL import Image, ImageDraw

    try:
        left, top, right, bottom = font.getbbox(char)
        if right <= left or bottom <= top:
            return np.zeros((0, 0), np.uint8)
        image = Image.new("L", (right - left, bottom - top))
        ImageDraw.Draw(image).text((-left, -top), char, font=font, fill=255)
    except OSError:  # FreeType refuses the glyph (e.g. "invalid opcode" in its hinting code)
        return np.zeros((0, 0), np.uint8)
    pixels = np.asarray(image)
    rows, cols = np.flatnonzero(pixels.max(1) >= INK), np.flatnonzero(pixels.max(0) >= INK)
    if not len(rows):
        return np.zeros((0, 0), np.uint8)
    return pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def draws(path, char: str, index: int = 0) -> bool:
    """Whether face `index` of the font file draws `char`: in its cmap, and `drawn`."""
    from fontTools.ttLib import TTFont

    with TTFont(path, fontNumber=index, lazy=True) as font:
        cmap = font.getBestCmap() or {}
    missing = next((p for p in MISSING if p not in cmap), None)
    return ord(char) in cmap and bool(drawn(str(path), index, missing, [ord(char)]))


def drawn(path: str, index: int, missing: int | None, points: list[int]) -> list[int]:
    """The code points, of `points`, that face `index` of the font file draws as neither blank
    nor its .notdef glyph (what it shows for `missing`, a code point outside its cmap)."""
    font = _font(path, index, CHECK_PX)
    notdef = ink(font, chr(missing)) if missing is not None else None
    kept = []
    for point in points:
        pixels = ink(font, chr(point))
        if pixels.size and not (notdef is not None and np.array_equal(pixels, notdef)):
            kept.append(point)
    return kept


def _canvas(pixels: np.ndarray, side: int):
    """The ink scaled to fit a box MARGIN inside a black square of `side`, centred (L image)."""
    from PIL import Image

    box = side - 2 * round(MARGIN * side)
    h, w = pixels.shape
    scale = box / max(h, w)
    glyph = Image.fromarray(pixels).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                           Image.Resampling.LANCZOS)
    canvas = Image.new("L", (side, side))
    canvas.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return canvas


def _look_job(job) -> np.ndarray:
    """Small unaugmented drawings (n, LOOK * LOOK) in [0, 1]: what look-alikes are judged on."""
    path, index, points = job
    font = _font(path, index, 2 * LOOK)
    looks = [np.asarray(_canvas(ink(font, chr(p)), 2 * LOOK).reduce(2)) for p in points]
    return np.stack(looks).reshape(len(points), -1).astype(np.float32) / 255


# ---------------------------------------------------------------- choosing faces and classes ----
def choose_faces(coverage: dict[Face, set[int]], target: int, pool) -> tuple[list[Face], set[int],
                                                                            list[dict]]:
    """Greedy and deterministic, faces by repertoire, largest first: a face is kept when the
    characters every kept face has stay at least `target` many (or, below it, do not shrink).
    Run on the cmaps, then again on what the faces kept actually draw of the characters left
    (rendering only those: a cmap rarely lies, and rendering every cmap would take long)."""
    order = sorted(coverage, key=lambda f: (-len(coverage[f]), f.design, f.label))
    mapped, common, dropped = _greedy(order, coverage, target, "has")
    jobs = [(*face.key, face.missing, sorted(common)) for face in mapped]
    sets = {face: set(done) for face, done in zip(mapped, _map(pool, _drawn_job, jobs))}
    kept, common, undrawn = _greedy(mapped, sets, target, "draws")
    return kept, common, dropped + undrawn


def _drawn_job(job) -> list[int]:
    return drawn(*job)


def _greedy(order: list[Face], sets: dict[Face, set[int]], target: int, verb: str):
    kept, common, dropped = [], None, []
    for face in order:
        floor = 1 if common is None else min(target, len(common))
        shared = sets[face] if common is None else common & sets[face]
        if len(shared) < floor:
            reason = f"it {verb} none of the characters asked for" if common is None else (
                f"it {verb} {len(shared)} of the {len(common)} characters the faces kept before "
                f"it share, fewer than the {floor} needed")
            dropped.append(_left_out(face.path, face.index, face.name, reason))
            continue
        kept.append(face)
        common = shared
    return kept, common or set(), dropped


def _looks(faces: list[Face], points: list[int], pool) -> np.ndarray:
    """Small drawings of `points` by every face: (len(points), len(faces), LOOK * LOOK)."""
    jobs = [(*face.key, points[i:i + CHUNK]) for face in faces
            for i in range(0, len(points), CHUNK)]
    done = iter(_map(pool, _look_job, jobs))
    per_face = [np.concatenate([next(done) for _ in range(0, len(points), CHUNK)])
                for _ in faces]
    return np.stack(per_face, axis=1)


def _alike(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(m, k) bool: whether a[i] and b[j] (vectors in [0, 1]) are the same drawing."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
    return d2 < ALIKE ** 2 * a.shape[1]


def tidy_faces(faces: list[Face], looks: np.ndarray) -> tuple[list[Face], list[int], list[dict],
                                                               list[str]]:
    """Merge families drawing >= SAME_DESIGN of `looks` alike, then leave out each face drawing
    >= SAME_FACE of them like an earlier face of its family. Returns the faces (designs
    updated), their columns of `looks`, the faces left out and the merges, in sentences."""
    n = len(faces)
    share = np.stack([(((looks - looks[:, f:f + 1]) ** 2).mean(2) < ALIKE ** 2).mean(0)
                      for f in range(n)])  # (n, n): the share of characters f and g draw alike
    designs, merges = {f.design: f.design for f in faces}, []
    for f in range(n):
        for g in range(f + 1, n):
            a, b = designs[faces[f].design], designs[faces[g].design]
            if a != b and share[f, g] >= SAME_DESIGN:
                merges.append(f"{faces[f].label} ({a}) and {faces[g].label} ({b}) draw "
                              f"{share[f, g]:.0%} of the sampled characters alike: one design")
                designs = {k: a if v == b else v for k, v in designs.items()}
    faces = [replace(face, design=designs[face.design]) for face in faces]
    kept, dropped = [], []
    for g, face in enumerate(faces):
        twin = next((f for f in kept if faces[f].design == face.design
                     and share[f, g] >= SAME_FACE), None)
        if twin is None:
            kept.append(g)
        else:
            dropped.append(_left_out(face.path, face.index, face.name, f"it draws "
                                     f"{share[twin, g]:.0%} of the sampled characters like "
                                     f"{faces[twin].label}"))
    return [faces[g] for g in kept], kept, dropped, merges


def choose_classes(order: list[int], looks: np.ndarray, faces: list[Face], n: int,
                   pool) -> list[int]:
    """The first `n` code points of `order` (drawn as `looks` so far) that are not look-alikes
    of one chosen before (alike in more than half the faces), sorted; more drawn as needed."""
    chosen, bank = [], np.zeros((0, *looks.shape[1:]), np.float32)
    while len(chosen) < n and order:
        batch, order = order[:len(looks)], order[len(looks):]
        votes_old = sum(_alike(looks[:, f], bank[:, f]).astype(int) for f in range(len(faces)))
        votes_new = sum(_alike(looks[:, f], looks[:, f]).astype(int) for f in range(len(faces)))
        taken = []
        for i, point in enumerate(batch):
            twins = (votes_old[i] > len(faces) / 2).any() or \
                (votes_new[i, taken] > len(faces) / 2).any()
            if not twins and len(chosen) < n:
                chosen.append(point)
                taken.append(i)
        bank = np.concatenate([bank, looks[taken]])
        if len(chosen) < n and order:
            looks = _looks(faces, order[:n - len(chosen) + SPARE], pool)
    return sorted(chosen)


def split_designs(designs: list[str], recipe: Recipe) -> dict[str, str]:
    """design -> "train" | "val" | "test": a seeded choice of the validation and test ones."""
    need = recipe.val_families + recipe.test_families + 1
    if len(designs) < need:
        raise DataError(f"fonts: {len(designs)} design families ({', '.join(designs)}) are too "
                        f"few for {recipe.val_families} validation, {recipe.test_families} test "
                        "and at least one training family: add fonts (--fonts) or ask for fewer "
                        "(--val-families, --test-families)")
    order = np.random.default_rng(recipe.seed).permutation(len(designs))
    parts = ["val"] * recipe.val_families + ["test"] * recipe.test_families
    parts += ["train"] * (len(designs) - len(parts))
    return {designs[i]: part for i, part in zip(order, parts)}


# ---------------------------------------------------------------- images -------------------------
def _augment(canvas, copies: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """`copies` variations of one glyph's canvas (L image, side SUPERSAMPLE * size): its stroke
    weight, then one warp (affine and elastic), then averaged down to the size. uint8."""
    from PIL import Image, ImageFilter

    weights, images = {0: canvas}, []
    for weight, mesh in zip(rng.choice(STROKES, copies).tolist(), _meshes(copies, canvas.width,
                                                                          rng)):
        if weight > 0 and weight not in weights:  # by a 3 x 3 square, once per canvas
            weights[weight] = canvas.filter(ImageFilter.MaxFilter(3))
        elif weight not in weights:  # a hairline would vanish: erode what keeps THIN of its ink
            eroded = canvas.filter(ImageFilter.MinFilter(3))
            keeps = np.asarray(eroded).sum() >= THIN * np.asarray(canvas).sum()
            weights[weight] = eroded if keeps else canvas
        warped = weights[weight].transform(canvas.size, Image.Transform.MESH, mesh,
                                           Image.Resampling.BILINEAR)
        images.append(np.asarray(warped.reduce(SUPERSAMPLE)))  # box average: antialiased
    return np.stack(images)


def _meshes(n: int, side: int, rng: np.random.Generator) -> list[list]:
    """n warps as Pillow MESH data: for each of CELLS x CELLS output cells the quadrilateral it
    is read from, whose corners are turned, sheared and scaled about the centre, shifted, and
    each moved by its own random displacement (the elastic part; bilinear within a cell)."""
    ticks = np.linspace(0, side, CELLS + 1)
    y, x = np.meshgrid(ticks - side / 2, ticks - side / 2, indexing="ij")
    angle = np.deg2rad(rng.uniform(-ROTATE, ROTATE, n))
    shear, scale = rng.uniform(-SHEAR, SHEAR, n), rng.uniform(*SCALE, n)
    shift = rng.uniform(-SHIFT, SHIFT, (2, n)) * side
    bend = rng.normal(0, ELASTIC * SUPERSAMPLE, (2, n, CELLS + 1, CELLS + 1))
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale  # output -> source: the inverse zoom
    rows = [c[:, None, None] for c in (cos, cos * shear - sin, sin, sin * shear + cos)]
    sx = rows[0] * x + rows[1] * y + side / 2 - shift[0][:, None, None] + bend[0]
    sy = rows[2] * x + rows[3] * y + side / 2 - shift[1][:, None, None] + bend[1]
    corners = np.stack([sx, sy], axis=-1)  # (n, CELLS + 1, CELLS + 1, 2): (row, column)
    quads = np.concatenate([corners[:, :-1, :-1], corners[:, 1:, :-1], corners[:, 1:, 1:],
                            corners[:, :-1, 1:]], axis=-1)  # Pillow's order: UL, LL, LR, UR
    edges = ticks.round().astype(int).tolist()
    boxes = [(edges[j], edges[i], edges[j + 1], edges[i + 1]) for i in range(CELLS)
             for j in range(CELLS)]
    return [list(zip(boxes, map(tuple, quad.reshape(-1, 8).tolist()))) for quad in quads]


def _render_job(job) -> np.ndarray:
    """`copies` images of each code point drawn by one face: (len(points) * copies, size, size).
    Each (face, code point) has its own generator: the same bytes however the work is split."""
    path, index, sha, points, copies, size, seed = job
    font = _font(path, index, SUPERSAMPLE * size)
    images = []
    for point in points:
        rng = np.random.default_rng([seed, int(sha[:16], 16), index, point])
        pixels = ink(font, chr(point))
        if not pixels.size:  # it drew at CHECK_PX: never a blank image in the set
            raise DataError(f"fonts: {Path(path).name}#{index} draws U+{point:04X} at "
                            f"{CHECK_PX} px but not at {SUPERSAMPLE * size} px")
        images.append(_augment(_canvas(pixels, SUPERSAMPLE * size), copies, rng, size))
    return np.concatenate(images)


def render_images(faces: list[Face], points: list[int], copies: int, recipe: Recipe,
                  pool) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, size, size) uint8 and labels (N,) int64 of every class by every face, in a
    seeded shuffled order (a prefix of them, e.g. data.train_size, spans every face)."""
    jobs = [(*face.key, face.sha256, points[i:i + CHUNK], copies, recipe.size, recipe.seed)
            for face in faces for i in range(0, len(points), CHUNK)]
    empty = np.zeros((0, recipe.size, recipe.size), np.uint8)
    x = np.concatenate([empty, *_map(pool, _render_job, jobs)])
    y = np.tile(np.repeat(np.arange(len(points)), copies), len(faces))
    order = np.random.default_rng([recipe.seed, len(x)]).permutation(len(x))
    return x[order], y[order]


def _map(pool, function, jobs: list) -> list:
    return pool.map(function, jobs, chunksize=1) if pool else [function(job) for job in jobs]


# ---------------------------------------------------------------- the whole set ------------------
@dataclass(frozen=True)
class Plan:
    """What will be drawn: the faces, each family's split, the classes, what was left out."""
    faces: list[Face]
    parts: dict[str, str]  # design family -> "train" | "val" | "test"
    points: list[int]  # the classes' code points, sorted
    dropped: list[dict]  # faces left out, each with its reason
    merges: list[str]  # families found to be one design, in sentences


def plan(coverage: dict[Face, set[int]], recipe: Recipe, pool) -> Plan:
    """Faces, classes and splits, in the order the module's docstring gives."""
    faces, common, dropped = choose_faces(coverage, recipe.classes, pool)
    if not faces:
        raise DataError(f"fonts: no face draws any character of chars={recipe.chars!r}")
    order = [int(p) for p in np.random.default_rng(recipe.seed).permutation(sorted(common))]
    looks = _looks(faces, order[:recipe.classes + SPARE], pool)
    faces, columns, twins, merges = tidy_faces(faces, looks)
    points = choose_classes(order, looks[:, columns], faces, recipe.classes, pool)
    parts = split_designs(sorted({face.design for face in faces}), recipe)
    return Plan(faces, parts, points, dropped + twins, merges)


def build(fonts=None, out=None, recipe: Recipe | dict | None = None,
          processes: int = PROCESSES) -> dict[str, np.ndarray]:
    """The set from the font files or folders `fonts` (default: /usr/share/fonts) as arrays
    x_train, y_train, x_val, y_val (unless no validation family), x_test, y_test, classes;
    written to OUT/fonts.npz and OUT/manifest.json when `out` is given. A `recipe` dict (a
    config's data.kwargs) becomes a Recipe. Faces left out are reported on stderr."""
    started = time.time()
    recipe = recipe if isinstance(recipe, Recipe) else Recipe(**(recipe or {}))
    paths = find_fonts(fonts or FONT_DIRS)
    coverage, unread = read_faces(paths, recipe.chars)
    pool = multiprocessing.get_context("fork").Pool(processes) if processes > 1 else None
    try:
        chosen = plan(coverage, recipe, pool)
        chosen = replace(chosen, dropped=unread + chosen.dropped)
        for face in chosen.dropped:  # before the long part: why a face is missing
            print(f"fonts: left out {face['file']}#{face['face']}: {face['reason']}",
                  file=sys.stderr)
        for merge in chosen.merges:
            print(f"fonts: {merge}", file=sys.stderr)
        arrays = {}
        for part in ("train", "val", "test"):
            members = [f for f in chosen.faces if chosen.parts[f.design] == part]
            copies = recipe.per_font if part == "train" else recipe.eval_per_font
            if members:
                arrays[f"x_{part}"], arrays[f"y_{part}"] = render_images(
                    members, chosen.points, copies, recipe, pool)
    finally:
        if pool:
            pool.terminate()
    arrays["classes"] = np.array([chr(p) for p in chosen.points])
    if out is not None:
        _write(Path(out), arrays, chosen, recipe, fonts or FONT_DIRS, time.time() - started)
    return arrays


def _write(out: Path, arrays: dict, chosen: Plan, recipe: Recipe, fonts, seconds: float) -> None:
    from PIL import ImageFont, __version__ as pillow

    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "seed": recipe.seed, "size": recipe.size,
        "arguments": {**asdict(recipe), "fonts": [str(p) for p in fonts]},
        "renderer": {"pillow": pillow, "freetype": ImageFont.core.freetype2_version},
        "faces": [{"file": f.path.name, "path": str(f.path), "face": f.index,
                   "sha256": f.sha256, "name": f.name, "family": f.design,
                   "split": chosen.parts[f.design]} for f in chosen.faces],
        "families": dict(sorted(chosen.parts.items())), "merged": chosen.merges,
        "dropped": chosen.dropped, "code_points": chosen.points,
        "classes": [chr(p) for p in chosen.points],
        "images": {k[2:]: len(v) for k, v in arrays.items() if k.startswith("y_")},
        "npz_sha256": write_npz(out / "fonts.npz", arrays), "seconds": round(seconds, 1)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """np.savez's layout without its clock (it dates each entry now): every entry dated
    1980-01-01, so the same arrays give the same bytes. Returns the file's sha256."""
    partial = path.with_name(path.name + ".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, value in arrays.items():
            entry = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(entry, "w", force_zip64=True) as stream:
                np.lib.format.write_array(stream, np.asarray(value), allow_pickle=False)
    partial.replace(path)  # whole or not at all
    return hashlib.sha256(path.read_bytes()).hexdigest()


def summary(manifest: dict) -> str:
    """A few lines on a built set, from its manifest."""
    lines = [f"fonts: {len(manifest['code_points'])} classes ({manifest['arguments']['chars']}) "
             f"from {len(manifest['faces'])} faces of {len(manifest['families'])} design "
             f"families, {len(manifest['dropped'])} faces left out, in {manifest['seconds']}s"]
    for part, count in manifest["images"].items():
        families = [d for d, p in manifest["families"].items() if p == part]
        faces = sum(f["split"] == part for f in manifest["faces"])
        lines.append(f"  {part:5} {count:9,} images  {faces:3} faces  {len(families):2} "
                     f"families: {', '.join(families)}")
    lines.append(f"  fonts.npz sha256 {manifest['npz_sha256']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ensemble.fonts", description=__doc__
                                     .split("\n\n")[0], formatter_class=argparse.
                                     RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for fonts.npz and manifest.json")
    parser.add_argument("--fonts", nargs="+", default=list(FONT_DIRS),
                        help="font folders or files (default: %(default)s)")
    for field in fields(Recipe):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default),
                            default=field.default, help="default: %(default)s")
    parser.add_argument("--processes", type=int, default=PROCESSES, help="default: %(default)s")
    args = parser.parse_args(argv)
    try:
        recipe = Recipe(**{field.name: getattr(args, field.name) for field in fields(Recipe)})
        build(args.fonts, args.out, recipe, args.processes)
    except DataError as err:
        raise SystemExit(str(err)) from None
    print(summary(json.loads((Path(args.out) / "manifest.json").read_text())))


if __name__ == "__main__":
    main()
