"""The many-class set drawn from fonts (ensemble.fonts), built tiny from the fonts matplotlib
ships (DejaVu, STIXGeneral, Computer Modern): no font package needed, seconds on two cores."""
import hashlib
import json
import string
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from ensemble import fonts
from ensemble.config import DataConfig
from ensemble.errors import DataError
from ensemble.sources import read

TINY = {"chars": "letters", "classes": 20, "size": 16, "per_font": 2, "eval_per_font": 1,
        "val_families": 1, "test_families": 2}
MATPLOTLIB_DESIGNS = {"DejaVu Sans", "DejaVu Serif", "DejaVu Sans Mono", "STIXGeneral",
                      "Computer Modern Roman", "Computer Modern Sans",
                      "Computer Modern Typewriter"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(arrays, output folder, manifest) of the tiny set, drawn in this process."""
    out = tmp_path_factory.mktemp("fonts")
    arrays = fonts.build(fonts.matplotlib_fonts(), out, TINY, processes=1)
    return arrays, out, json.loads((out / "manifest.json").read_text())


def dejavu() -> Path:
    return next(p for p in fonts.matplotlib_fonts() if p.name == "DejaVuSans.ttf")


def test_every_split_holds_every_class_as_white_glyphs_on_black(built):
    arrays, _, manifest = built
    assert set(arrays) == {"x_train", "y_train", "x_val", "y_val", "x_test", "y_test",
                           "classes"}
    assert arrays["classes"].dtype.kind == "U" and len(arrays["classes"]) == 20
    for part, copies in (("train", 2), ("val", 1), ("test", 1)):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        faces = sum(face["split"] == part for face in manifest["faces"])
        assert x.dtype == np.uint8 and x.shape == (20 * faces * copies, 16, 16)
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert set(np.unique(y)) == set(range(20))  # every class, from every face
        assert (x.reshape(len(x), -1).max(1) > 128).all()  # a glyph in every image
        border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)
        assert border.mean() < 0.1 * x[:, 4:12, 4:12].mean()  # centred, on black
    assert manifest["images"] == {"train": len(arrays["y_train"]), "val":
                                  len(arrays["y_val"]), "test": len(arrays["y_test"])}


def test_what_survives_of_matplotlibs_fonts(built):
    """Seven designs; the Display faces (a few dozen characters) are left out; the Computer
    Modern faces stay, so the classes are the letters they have too: ASCII ones."""
    _, _, manifest = built
    assert set(manifest["families"]) == MATPLOTLIB_DESIGNS
    assert len(manifest["faces"]) == 22  # of 24: matplotlib_fonts() less the two Display faces
    family = {face["file"]: face["family"] for face in manifest["faces"]}
    assert family["DejaVuSans-BoldOblique.ttf"] == family["DejaVuSans.ttf"] == "DejaVu Sans"
    assert family["DejaVuSansMono-Bold.ttf"] == "DejaVu Sans Mono"
    assert family["cmb10.ttf"] == family["cmti10.ttf"] == "Computer Modern Roman"
    left_out = {face["file"]: face["reason"] for face in manifest["dropped"]}
    assert set(left_out) == {"DejaVuSansDisplay.ttf", "DejaVuSerifDisplay.ttf"}
    assert "has 0 of the 52 characters" in left_out["DejaVuSansDisplay.ttf"]
    assert set("".join(manifest["classes"])) <= set(string.ascii_letters)
    assert manifest["code_points"] == sorted(map(ord, manifest["classes"]))


def test_more_classes_than_computer_modern_draws_leaves_it_out(tmp_path, capsys):
    """Asking for 60 letters: the cm faces (52 ASCII letters) would shrink the set below 60,
    so they go, with their reason, and Greek and Cyrillic letters become classes."""
    fonts.main(["--out", str(tmp_path), "--fonts", *map(str, fonts.matplotlib_fonts()),
                "--chars", "letters", "--classes", "60", "--size", "12", "--per-font", "1",
                "--eval-per-font", "1", "--val-families", "1", "--test-families", "2",
                "--processes", "1"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    left_out = {face["file"]: face["reason"] for face in manifest["dropped"]}
    assert {"cmr10.ttf", "cmb10.ttf", "cmti10.ttf", "cmmi10.ttf", "cmss10.ttf",
            "cmtt10.ttf"} <= set(left_out)
    assert "52 of the" in left_out["cmr10.ttf"] and "fewer than the 60" in left_out["cmr10.ttf"]
    assert set(manifest["families"]) == {"DejaVu Sans", "DejaVu Serif", "DejaVu Sans Mono",
                                         "STIXGeneral"}
    names = [unicodedata.name(c) for c in manifest["classes"]]
    assert len(names) == 60 and any("GREEK" in n for n in names) and \
        any("CYRILLIC" in n for n in names)
    out = capsys.readouterr()
    assert "60 classes (letters) from 16 faces of 4 design families" in out.out
    assert "left out cmr10.ttf#0: it has 52 of the" in out.err


def test_no_family_is_split_between_training_validation_and_test(built):
    _, _, manifest = built
    splits = {}
    for face in manifest["faces"]:
        splits.setdefault(face["family"], set()).add(face["split"])
    assert all(len(parts) == 1 for parts in splits.values())
    per_part = [sum(manifest["families"][f] == p for f in splits) for p in ("val", "test")]
    assert per_part == [1, 2] and len(splits) == 7  # and the four others train


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_images(built, tmp_path):
    arrays, out, manifest = built
    again = fonts.build(fonts.matplotlib_fonts(), tmp_path / "again", TINY, processes=2)
    assert (tmp_path / "again" / "fonts.npz").read_bytes() == (out / "fonts.npz").read_bytes()
    assert hashlib.sha256((out / "fonts.npz").read_bytes()).hexdigest() == \
        manifest["npz_sha256"]
    assert all(np.array_equal(again[k], arrays[k]) for k in arrays)
    other = fonts.build(fonts.matplotlib_fonts(), None, {**TINY, "seed": 1}, processes=1)
    assert other["x_train"].shape[1:] == arrays["x_train"].shape[1:]
    assert not np.array_equal(other["x_test"], arrays["x_test"])
    assert not np.array_equal(other["classes"], arrays["classes"])


def test_blank_and_notdef_glyphs_are_not_drawn():
    path = dejavu()
    font = fonts._font(str(path), 0, fonts.CHECK_PX)
    assert fonts.ink(font, "\u4e00").size > 0  # DejaVu has no Han: its .notdef box shows
    assert fonts.drawn(str(path), 0, 0x10FFFD, [ord("A"), ord(" "), 0x4E00, ord("\u03a9")]) \
        == [ord("A"), ord("\u03a9")]  # a space is blank; U+4E00 is the .notdef box
    assert fonts.drawn(str(path), 0, None, [0x4E00]) == [0x4E00]  # the box, when not known
    assert fonts.draws(path, "A") and not fonts.draws(path, " ")
    assert not fonts.draws(path, "\u4e00")


def test_the_npz_reads_through_the_projects_npz_source(built):
    arrays, out, _ = built
    got = read(DataConfig(npz=str(out / "fonts.npz")))
    assert got.classes == tuple(arrays["classes"])
    assert got.train_x.shape == (len(arrays["y_train"]), 1, 16, 16)
    np.testing.assert_array_equal(got.val_x[:, 0], arrays["x_val"])
    np.testing.assert_array_equal(got.test_y, arrays["y_test"])


def test_too_few_families_is_refused_in_one_sentence(tmp_path):
    with pytest.raises(SystemExit) as refused:
        fonts.main(["--out", str(tmp_path), "--fonts", *map(str, fonts.matplotlib_fonts()),
                    "--chars", "letters", "--classes", "20", "--size", "8", "--processes",
                    "1"])  # 3 validation and 5 test families of 7
    message = str(refused.value.code)
    assert message.startswith("fonts: 7 design families (") and "too few for 3 validation, 5 "\
        "test and at least one training family" in message
    assert "\n" not in message and message.count(". ") == 0
    assert not (tmp_path / "fonts.npz").exists()
    with pytest.raises(DataError, match="too few"):
        fonts.split_designs(["a", "b"], fonts.Recipe(val_families=1, test_families=1))


@pytest.mark.parametrize("family, design", [
    ("Noto Sans CJK JP", "Noto Sans CJK"), ("Noto Sans Mono CJK KR", "Noto Sans CJK"),
    ("Noto Serif CJK SC", "Noto Serif CJK"), ("IPAPGothic", "IPA Gothic"),
    ("IPAexGothic", "IPA Gothic"), ("TakaoPGothic", "IPA Gothic"), ("IPAMincho", "IPA Mincho"),
    ("VL PGothic", "VL Gothic"), ("AR PL UMing TW MBE", "AR PL Ming"),
    ("WenQuanYi Micro Hei Mono", "Droid Sans Fallback"), ("LXGW WenKai Mono", "Klee One"),
    ("DejaVu Sans Condensed", "DejaVu Sans"), ("DejaVu Sans Mono", "DejaVu Sans Mono"),
    ("DejaVu Serif Display", "DejaVu Serif"), ("Liberation Sans Narrow", "Liberation Sans"),
    ("cmmi10", "Computer Modern Roman"), ("cmtt10", "Computer Modern Typewriter")])
def test_design_families_from_names(family, design):
    assert fonts.design_of(family) == design


def test_look_alike_faces_and_characters():
    """Faces: a twin in its family is left out, families drawing alike merge. Characters: one
    alike in most faces to one chosen before is not a class."""
    rng = np.random.default_rng(0)
    base = rng.random((8, 1, 16)).astype(np.float32)  # 8 characters, 16-pixel drawings
    other = rng.random((8, 1, 16)).astype(np.float32)
    looks = np.concatenate([base, base, other, other], axis=1)  # faces a1, a2, b, c
    looks[:3, 3] = rng.random((3, 16))  # c draws 5 of 8 like b: over SAME_DESIGN
    faces = [fonts.Face(Path(f"{name}.ttf"), 0, name, design, "0" * 64, None)
             for name, design in (("a1", "A"), ("a2", "A"), ("b", "B"), ("c", "C"))]
    kept, columns, dropped, merges = fonts.tidy_faces(faces, looks)
    assert [f.path.name for f in kept] == ["a1.ttf", "b.ttf", "c.ttf"] and columns == [0, 2, 3]
    assert [f.design for f in kept] == ["A", "B", "B"] and len(merges) == 1
    assert dropped[0]["file"] == "a2.ttf" and "100% of the sampled characters like a1.ttf#0" \
        in dropped[0]["reason"]
    twins = looks[:, columns].copy()
    twins[5] = twins[2]  # character 5 looks like character 2 in every face
    twins[6, 0] = twins[1, 0]  # character 6 like 1 in one face of three: still a class
    chosen = fonts.choose_classes(list(range(100, 108)), twins, kept, 7, None)
    assert chosen == [100, 101, 102, 103, 104, 106, 107]
