"""images.py: ADM crop, mode handling, bad inputs, and the four source kinds."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latent_patch import images
from latent_patch.images import BadImage, adm_center_crop, load_image
from latent_patch.sources import list_source


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


# ----------------------------------------------------------------------------- ADM crop


def test_adm_crop_halves_with_box_then_bicubic(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[tuple[int, int], int]] = []
    real = Image.Image.resize

    def spy(self, size, resample=None, *a, **kw):
        calls.append((tuple(size), resample))
        return real(self, size, resample, *a, **kw)

    monkeypatch.setattr(Image.Image, "resize", spy)
    out = adm_center_crop(Image.new("RGB", (1000, 600)), 64)
    box, bic = Image.Resampling.BOX, Image.Resampling.BICUBIC
    # 600 -> 300 -> 150 -> 75 (75 < 128 stops), then 75 -> 64 with BICUBIC, width round(125*64/75)
    assert calls == [((500, 300), box), ((250, 150), box), ((125, 75), box), ((107, 64), bic)]
    assert out.size == (64, 64)


@pytest.mark.parametrize("wide", [True, False])
def test_adm_crop_takes_the_center(wide: bool) -> None:
    ramp = np.tile(np.arange(100, dtype=np.uint8), (64, 1))  # value = column index
    a = np.stack([ramp] * 3, -1) if wide else np.stack([ramp.T] * 3, -1)
    out = np.asarray(adm_center_crop(Image.fromarray(a), 64))
    line = out[0, :, 0] if wide else out[:, 0, 0]
    assert out.shape == (64, 64, 3)
    np.testing.assert_array_equal(line, np.arange(18, 82))  # (100 - 64) // 2 = 18


def test_tiny_and_odd_images_encode_to_full_size() -> None:
    for size in [(1, 1), (3, 200), (513, 257)]:
        a = load_image(_png(Image.new("RGB", size, (10, 20, 30))), 32)
        assert a.shape == (32, 32, 3) and a.dtype == np.uint8
        assert abs(int(a[16, 16, 0]) - 10) <= 1


# ----------------------------------------------------------------------------- modes


def test_alpha_is_composited_on_white() -> None:
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    half = Image.new("LA", (8, 8), (0, 128))
    assert (load_image(_png(clear), 8) == 255).all()
    assert abs(int(load_image(_png(half), 8)[0, 0, 0]) - 127) <= 1
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0] * 256)
    assert (load_image(_png(pal, transparency=0), 8) == 255).all()


def test_wide_modes_are_scaled_to_8_bit() -> None:
    a16 = np.full((8, 8), 65535, np.uint16)
    a16[:4] = 32896  # 128 * 257
    out = load_image(_png(Image.fromarray(a16)), 8)
    assert out[0, 0].tolist() == [128] * 3 and out[7, 7].tolist() == [255] * 3
    f = Image.fromarray(np.full((8, 8), 0.5, np.float32))
    buf = io.BytesIO()
    f.save(buf, "TIFF")
    assert load_image(buf.getvalue(), 8)[0, 0].tolist() == [128] * 3


def test_cmyk_grey_and_bilevel_become_rgb() -> None:
    """Every pixel, against an expectation written by hand: CMYK by the textbook formula
    R = (255 - C)(255 - K) / 255, grey L as (L, L, L), bilevel "1" as black or white."""
    rng = np.random.default_rng(0)
    cmyk = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    grey = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    bits = rng.random((16, 16)) < 0.5
    cases = {
        "CMYK": (Image.fromarray(cmyk, "CMYK"),
                 (255 - cmyk[..., :3].astype(float)) * (255 - cmyk[..., 3:].astype(float)) / 255),
        "L": (Image.fromarray(grey, "L"), np.repeat(grey[..., None], 3, -1)),
        "1": (Image.fromarray(bits), np.repeat(np.where(bits, 255, 0)[..., None], 3, -1)),
    }
    for mode, (im, expect) in cases.items():
        assert im.mode == mode
        buf = io.BytesIO()
        im.save(buf, "TIFF")  # lossless: the decoded pixels are the ones written
        a = load_image(buf.getvalue(), 16)  # 16 px in, 16 px out: no resampling
        assert a.shape == (16, 16, 3) and a.dtype == np.uint8
        err = np.abs(a.astype(float) - expect).max()
        assert err <= (1 if mode == "CMYK" else 0), (mode, err)


def test_exif_orientation_is_applied() -> None:
    rng = np.random.default_rng(0)
    im = Image.fromarray((rng.random((20, 40, 3)) * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    tagged = load_image(_png(im, exif=exif), 16)
    upright = load_image(_png(im.transpose(Image.Transpose.ROTATE_270)), 16)
    np.testing.assert_array_equal(tagged, upright)


def test_flip_mirrors_the_crop() -> None:
    rng = np.random.default_rng(1)
    data = _png(Image.fromarray((rng.random((30, 50, 3)) * 255).astype(np.uint8)))
    np.testing.assert_array_equal(load_image(data, 16, flip=True), load_image(data, 16)[:, ::-1])


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_with_a_reason() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
    cases = {b"": "empty", b"not an image\n": "not an image",
             buf.getvalue()[: len(buf.getvalue()) // 3]: "truncated"}
    for data, word in cases.items():
        with pytest.raises(BadImage, match=word):
            load_image(data, 16)
    with pytest.raises(BadImage, match="too large"):
        load_image(_png(Image.new("RGB", (100, 100))), 16, max_pixels=9999)


# ----------------------------------------------------------------------------- sources


def test_class_tree_listing(tmp_path: Path, class_tree) -> None:
    counts = class_tree(tmp_path, per_class=4, classes=2)
    # the expected listing, from the disk: visible class folders in sorted order, their visible
    # files (bad ones too: they are found bad at decode time) labelled by the folder's index
    classes = sorted(e.name for e in tmp_path.iterdir() if e.is_dir() and not e.name.startswith("."))
    expect = sorted((f"{c}/{f.name}", k) for k, c in enumerate(classes)
                    for f in (tmp_path / c).iterdir() if not f.name.startswith("."))
    lst = list_source(tmp_path)
    assert lst.kind == "class_tree"
    assert lst.class_names == classes == ["c0", "c1", "c2_empty"]
    assert len(lst) == counts["good"] + counts["bad"]  # hidden files/folders ignored
    assert list(zip(lst.sources, lst.labels)) == expect
    assert [w["source"] for w in lst.warnings] == ["c2_empty/"]
    assert "empty class folder" in lst.warnings[0]["reason"]  # kept as a class, and says why
    assert list_source(tmp_path).sha256() == lst.sha256()


def test_flat_folder_with_val_solution_csv(tmp_path: Path) -> None:
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"ILSVRC2012_val_{i:08d}.JPEG")
    csv = tmp_path.parent / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n"
                   "ILSVRC2012_val_00000000,n02 1 2 3 4 n02 5 6 7 8\n"
                   "ILSVRC2012_val_00000001,n01 1 2 3 4\n"
                   "ILSVRC2012_val_00000002,n03 1 2 3 4\n")
    lst = list_source(tmp_path, labels=csv)
    assert lst.kind == "flat" and lst.class_names == ["n01", "n02", "n03"]
    assert lst.labels == [1, 0, 2]


def test_flat_folder_with_name_label_lines(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(src / name)
    labels = tmp_path / "labels.txt"
    labels.write_text("a.png 4\nb.png 0\nzz.png 1\n")
    lst = list_source(src, labels=labels)
    assert lst.labels == [4, 0, -1] and 2 in lst.problems  # c.png has no label
    assert lst.warnings[0]["source"] == "zz.png"
    with pytest.raises(BadImage, match="no label"):
        lst.read_bytes(2)
    with pytest.raises(ValueError, match="--labels"):
        list_source(src)


def _write_tar(path: Path, samples: list[tuple[str, bytes | None, int | None]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, img, cls in samples:
            for ext, data in (("jpg", img), ("cls", None if cls is None else str(cls).encode())):
                if data is None:
                    continue
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def test_tar_source_with_brace_pattern(tmp_path: Path) -> None:
    img = _png(Image.new("RGB", (10, 10), (255, 0, 0)))
    _write_tar(tmp_path / "train-000000.tar", [("x/a.1", img, 1), ("b", img, 0)])
    _write_tar(tmp_path / "train-000001.tar", [("c", img, None), ("d", None, 2)])
    (tmp_path / "classes.txt").write_text("zero\none\ntwo\n")
    lst = list_source(str(tmp_path / "train-{000000..000001}.tar"))
    assert lst.kind == "tars" and lst.class_names == ["zero", "one", "two"]
    assert lst.sources[0] == "train-000000.tar/x/a.1.jpg" and lst.labels[:2] == [1, 0]
    assert sorted(lst.problems) == [2, 3]
    assert (load_image(lst.read_bytes(1), 8)[..., 0] == 255).all()
    with pytest.raises(FileNotFoundError, match="000002"):
        list_source(str(tmp_path / "train-{000000..000002}.tar"))


def test_safe_stem() -> None:
    assert images.safe_stem("n01/ab c.d-e_f.JPEG") == "ab_c_d-e_f"


def test_compressed_tar_source_and_odd_entries_are_listed(tmp_path):
    """A .tar.gz source reads like a plain tar; FIFOs, dangling links and sub-folders are noted."""
    import io
    import tarfile

    from latent_patch.images import load_image
    from latent_patch.sources import list_source

    buf = io.BytesIO()
    Image.new("L", (28, 28), 200).save(buf, "PNG")
    with tarfile.open(tmp_path / "part-0.tar.gz", "w:gz") as tf:
        for i in range(3):
            for ext, data in (("png", buf.getvalue()), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    listing = list_source(str(tmp_path / "part-0.tar.gz"))
    assert listing.labels == [0, 1, 2] and listing.sources[0] == "part-0.tar.gz/s0.png"
    assert load_image(listing.read_bytes(2), 64).shape == (64, 64, 3)

    tree = tmp_path / "tree" / "c0"
    tree.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tree / "ok.png")
    (tree / "gone.JPEG").symlink_to(tmp_path / "nowhere")
    (tree / "dir.JPEG").mkdir()
    os.mkfifo(tree / "pipe.JPEG")
    listing = list_source(tmp_path / "tree")
    assert listing.sources == ["c0/ok.png"]
    reasons = {w["source"]: w["reason"] for w in listing.warnings}
    assert "dangling" in reasons["c0/gone.JPEG"] and "folder" in reasons["c0/dir.JPEG/"]
    assert "FIFO" in reasons["c0/pipe.JPEG"]
