"""A painted mask on the command line: `train-fnf --mask IMAGE`, the images it is painted on, and reading masks."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from focusfix_core import cli
from focusfix_core.io import load_mask_image
from focusfix_core.saliency import fit_mask
from focusfix_core.tiny.model import TinyConfig, TinyModel

SIZE = 16


@pytest.fixture
def model_file(tmp_path):
    cfg = TinyConfig(image_size=SIZE, channels=(16, 16, 32), heads=2, context_dim=16, text_layers=1)
    path = tmp_path / "tiny.safetensors"
    TinyModel.random(seed=0, config=cfg).save(path)
    return path


def args(model_file, out, *extra):
    return ["train-fnf", "--model", str(model_file), "--out", str(out), "--prompt", "a red circle",
            "--seeds", "0,1", "--reward", "color_red", "--iterations", "2", "--steps", "3", "--batch-size", "2",
            "--checkpoint-every", "1", *extra]


def png(path, array, mode=None):
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)
    return path


def half(tmp_path, name, side, size=4 * SIZE):
    """A grey-level mask painted white on the left or right half, at another size than the run's."""
    a = np.zeros((size, size))
    (a[:, : size // 2] if side == "left" else a[:, size // 2:])[...] = 255
    return png(tmp_path / name, a)


def test_a_painted_mask_trains_only_where_it_is_white(model_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(args(model_file, out, "--mask", str(half(tmp_path, "left.png", "left")))) == 0
    err = capsys.readouterr().err
    assert f"resized from {4 * SIZE}x{4 * SIZE} to {SIZE}x{SIZE}" in err
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["mask_source"] == "mask" and report["mask_coverage"] == 0.5
    # each item's I0 and I at full size, named in the order --mask takes one mask per item
    assert [(it["prompt"], it["seed"]) for it in report["items"]] == [("a red circle", 0), ("a red circle", 1)]
    for k, it in enumerate(report["items"]):
        for which in ("before", "after"):
            assert it[which] == str(out / f"{which}_{k}.png")
            assert Image.open(it[which]).size == (SIZE, SIZE)
    assert "`before_1.png`, `after_1.png`" in (out / "report.md").read_text()
    # I0 as written is the run's I0: painting on it and training again reproduces it
    I0 = torch.from_numpy(np.asarray(Image.open(out / "before_0.png"), dtype=np.float32) / 255)
    assert I0.shape == (SIZE, SIZE, 3) and I0.std() > 0


def test_resume_needs_the_same_painted_masks(model_file, tmp_path, capsys):
    out = tmp_path / "run"
    left, right = half(tmp_path, "left.png", "left"), half(tmp_path, "right.png", "right")
    assert cli.main(args(model_file, out, "--mask", str(left))) == 0
    more = ("--iterations", "3", "--resume")
    assert cli.main(args(model_file, out, *more, "--mask", str(right))) == 2
    assert "other painted masks" in capsys.readouterr().err
    assert cli.main(args(model_file, out, *more, "--mask", str(left))) == 0
    assert json.loads((out / "report.json").read_text())["steps_trained"] == 3


@pytest.mark.parametrize("extra, message", [
    (("--mask-source", "saliency"), "--mask gives a painted M, but --mask-source is 'saliency'"),
    (("--mask", "BLACK"), "marks nothing (every pixel is black)"),
    (("--mask", "NOT_AN_IMAGE"), "as a mask image"),
    (("--mask", "MISSING"), "not found"),
    (("--mask", "LEFT", "--mask", "LEFT", "--mask", "LEFT"), "got 3 masks; expected 1, one per seed (2)"),
])
def test_bad_painted_masks_are_refused_by_name(model_file, tmp_path, capsys, extra, message):
    files = {"BLACK": png(tmp_path / "black.png", np.zeros((SIZE, SIZE))),
             "GREY": png(tmp_path / "grey.png", np.full((SIZE, SIZE), 102)),
             "LEFT": half(tmp_path, "left.png", "left"), "MISSING": tmp_path / "missing.png"}
    (tmp_path / "junk.png").write_bytes(b"not an image")
    files["NOT_AN_IMAGE"] = tmp_path / "junk.png"
    extra = [str(files.get(e, e)) for e in extra]
    if "--mask" not in extra:
        extra += ["--mask", str(files["LEFT"])]
    out = tmp_path / "run"
    assert cli.main(args(model_file, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


def test_a_faint_painted_mask_trains_with_a_note(model_file, tmp_path, capsys):
    """Bad-input hunt (session 27): a 40 % brush was refused as marking nothing, but the region term holds it
    only in part (1 - M): it trains, and the note says how much of it is still held."""
    grey = png(tmp_path / "grey.png", np.full((SIZE, SIZE), 102))
    assert cli.main(args(model_file, tmp_path / "run", "--mask", str(grey))) == 0
    assert (f"note: --mask {grey} is faint (at most 0.4 white): even its strongest pixel is held 60% to I0"
            in capsys.readouterr().err)


def test_a_mask_painted_in_place_over_an_item_image_is_refused_before_the_run_removes_it(model_file, tmp_path,
                                                                                       capsys):
    """Painting over before_1.png where it lies and training again into that folder with --overwrite removed it
    (no item 1 any more), and the --resume after it could not find the mask (review C2)."""
    out = tmp_path / "run"
    assert cli.main(args(model_file, out)) == 0
    painted = half(out, "before_1.png", "left", SIZE)
    before = painted.read_bytes()
    for extra in (("--seeds", "1", "--overwrite"), ("--iterations", "3", "--resume")):
        assert cli.main(args(model_file, out, *extra, "--mask", str(painted))) == 2
        err = capsys.readouterr().err
        assert "is one of the files this run writes into --out" in err and "mask_before_1.png" in err
        assert painted.read_bytes() == before
    kept = painted.rename(out / "mask_before_1.png")  # the name the message suggests
    assert cli.main(args(model_file, out, "--seeds", "1", "--overwrite", "--mask", str(kept))) == 0
    assert kept.is_file()


def test_mask_source_mask_without_a_mask_is_refused(model_file, tmp_path, capsys):
    assert cli.main(args(model_file, tmp_path / "run", "--mask-source", "mask")) == 2
    assert "--mask-source mask needs --mask IMAGE" in capsys.readouterr().err


def test_earlier_item_images_are_not_overwritten(model_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    png(out / "before_0.png", np.zeros((4, 4)))  # e.g. the painted-on copy of an earlier run's I0
    assert cli.main(args(model_file, out, "--mask-source", "saliency")) == 2
    assert "before_0.png" in capsys.readouterr().err
    (out / "before_0.png").rename(out / "before_after_notes.png")  # not a name the run writes
    assert cli.main(args(model_file, out, "--mask-source", "saliency")) == 0


def test_overwrite_removes_item_images_of_an_earlier_larger_run(model_file, tmp_path):
    """Old before_N.png beside a report that lists fewer items invites painting on the wrong image."""
    out = tmp_path / "run"
    assert cli.main(args(model_file, out, "--mask-source", "saliency", "--seeds", "0-2")) == 0
    assert (out / "before_2.png").is_file()
    (out / "before_notes.png").write_bytes(b"the user's")
    assert cli.main(args(model_file, out, "--mask-source", "saliency", "--seeds", "0", "--overwrite")) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["after_0.png", "before_0.png", "before_after.png", "before_notes.png", "curves.png"]


def test_mask_images_read_as_comfyui_reads_them(tmp_path):
    grey = np.array([[0, 255], [128, 255]])
    assert torch.allclose(load_mask_image(png(tmp_path / "g.png", grey)),
                          torch.tensor([[0, 1], [128 / 255, 1]]))
    rgb = np.zeros((2, 2, 3))
    rgb[0, 0] = 255
    assert load_mask_image(png(tmp_path / "rgb.png", rgb)).tolist() == [[1, 0], [0, 0]]
    # transparency, as ComfyUI's mask editor saves it: the transparent (painted) part may change
    rgba = np.full((2, 2, 4), 255)
    rgba[1, 1, 3] = 0
    rgba[0, 1, 3] = 64
    M = load_mask_image(png(tmp_path / "a.png", rgba, "RGBA"))
    assert torch.allclose(M, torch.tensor([[0, 1 - 64 / 255], [0, 1]]))
    # an opaque alpha channel says nothing: the grey level is read
    rgba[..., 3] = 255
    rgba[0, 0, :3] = 0
    assert load_mask_image(png(tmp_path / "o.png", rgba, "RGBA")).tolist() == [[0, 1], [1, 1]]
    # a palette image with a transparent colour
    p = Image.fromarray(np.array([[0, 1], [1, 1]], dtype=np.uint8), "P")
    p.putpalette([255, 255, 255, 0, 0, 0])
    p.save(tmp_path / "p.png", transparency=0)
    assert load_mask_image(tmp_path / "p.png").tolist() == [[1, 0], [0, 0]]
    # 16-bit grey
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(tmp_path / "16.png")
    assert load_mask_image(tmp_path / "16.png").tolist() == [[0, 1]]
    # a float TIFF in 0..1 reads as it is (converting it to 8-bit grey first read 0.5 as black)
    Image.fromarray(np.array([[0, 0.5, 1]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert load_mask_image(tmp_path / "f.tif").tolist() == [[0, 0.5, 1]]


def test_white_painted_over_a_colour_before_image_without_alpha_is_refused(model_file, tmp_path, capsys):
    """A white stroke on before_0.png saved as RGB (no alpha) read as the picture's grey levels: coverage 0.57 for
    a 0.14 stroke, silently (user audit). The same stroke on black is the mask it means."""
    out = tmp_path / "run"
    assert cli.main(args(model_file, out, "--seeds", "0")) == 0
    I0 = np.asarray(Image.open(out / "before_0.png"))
    painted = I0.copy()
    painted[4:8] = 255
    mask = png(tmp_path / "mask_before_0.png", painted)
    assert Image.open(mask).mode == "RGB"
    again = ("--seeds", "0", "--mask", str(mask))
    assert cli.main(args(model_file, tmp_path / "again", *again)) == 2
    err = capsys.readouterr().err
    assert f"{str(mask)!r} is a colour image without transparency" in err
    assert "white and the rest black, or erase the region so it is transparent" in err
    stroke = np.zeros_like(I0)
    stroke[4:8] = 255
    png(mask, stroke)  # RGB too, but grey
    assert cli.main(args(model_file, tmp_path / "again", *again)) == 0
    assert json.loads((tmp_path / "again" / "report.json").read_text())["mask_coverage"] == 0.25


def _stroke(size=100):
    a = np.zeros((size, size, 3), np.uint8)
    a[20:40] = 255
    return a


def _jpeg(path, a, **kw):
    Image.fromarray(a).save(path, quality=30, **kw)
    return path


@pytest.mark.parametrize("make", [
    lambda p: _jpeg(p / "m.jpg", _stroke()),  # a grey mask as an RGB JPEG (4:2:0 chroma)
    lambda p: _jpeg(p / "m.jpg", _stroke()[..., 0]),
    lambda p: png(p / "m.png", np.clip(_stroke() + np.array([0, 4, 8]), 0, 255)),  # a near-grey brush
    lambda p: png(p / "m.png", np.where(np.arange(100)[:, None, None] == 99, [0, 255, 0], _stroke())),  # 1 %
    lambda p: png(p / "m.png", np.dstack([_stroke(), np.full((100, 100), 255)]), "RGBA"),  # opaque alpha
    lambda p: Image.fromarray(_stroke()).quantize(2).save(p / "m.png") or p / "m.png",  # a grey palette
])
def test_a_grey_mask_in_a_colour_format_reads_as_its_grey_level(tmp_path, make):
    M = load_mask_image(make(tmp_path))
    assert M.shape == (100, 100)
    assert float((M[20:40] - 1).abs().max()) < 0.05 and float(M[:20].max()) < 0.05 and float(M[41:99].max()) < 0.05


@pytest.mark.parametrize("make", [
    lambda p: png(p / "m.png", np.where(np.arange(100)[:, None, None] < 2, [0, 255, 0], _stroke())),  # 2 %
    lambda p: _jpeg(p / "m.jpg", _stroke() // 2 + np.array([100, 0, 0], np.uint8)),  # a red-brown picture
    lambda p: png(p / "m.png", np.dstack([_stroke() // 2 + np.array([0, 0, 90], np.uint8),
                                          np.full((100, 100), 255)]), "RGBA"),  # opaque: no transparency to read
    lambda p: Image.fromarray(_stroke() // 2 + np.array([100, 0, 0], np.uint8)).quantize(4).save(p / "m.png")
    or p / "m.png",  # a colour palette without a transparent colour
])
def test_a_colour_mask_without_transparency_is_refused_by_name(tmp_path, make):
    with pytest.raises(ValueError, match=r"m\.(png|jpg)' is a colour image without transparency .* Paint the "
                                         r"region that may change white and the rest black, or erase the region"):
        load_mask_image(make(tmp_path))


@pytest.mark.parametrize("values, dtype", [([0, 0.5, 255], np.float32), ([0, 2 ** 31 - 1], np.int32),
                                           ([0, float("nan")], np.float32)])
def test_mask_image_out_of_range_is_refused_not_guessed(tmp_path, values, dtype):
    """A 32-bit integer or float image outside 16-bit / 0..1 has no one reading (a clamp made it all white)."""
    Image.fromarray(np.array([values], dtype=dtype)).save(tmp_path / "m.tif")
    with pytest.raises(ValueError, match=r"m\.tif.*greyscale image with values .*Save the mask as an 8- or 16-bit PNG"):
        load_mask_image(tmp_path / "m.tif")


def test_fit_mask_resizes_and_says_so():
    M = torch.zeros(1, 1, 8, 8)
    M[..., :4] = 1
    same, note = fit_mask(M, (8, 8))
    assert same is M and note == ""
    big, note = fit_mask(M, (16, 16), "m")
    assert big.shape == (1, 1, 16, 16) and note == "m resized from 8x8 to 16x16"
    assert big[..., :7].min() == 1 and big[..., 9:].max() == 0
    _, note = fit_mask(torch.ones(1, 1, 8, 16), (16, 16))
    assert "another aspect ratio: stretched" in note
    # a thin stroke painted on a large image still may change once shrunk (an average faded it to 0)
    stroke = torch.zeros(1, 1, 512, 512)
    stroke[..., 200:203, 100:400] = 1
    small, _ = fit_mask(stroke, (16, 16))
    assert small.amax() == 1 and 0 < (small >= 0.5).float().mean() < 0.1
    # one side up, the other down
    mixed, _ = fit_mask(stroke, (1024, 16))
    assert mixed.shape == (1, 1, 1024, 16) and mixed.amax() == 1
