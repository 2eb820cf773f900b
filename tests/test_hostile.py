"""Hostile input, tried on purpose: sources a Parquet row names, bombs, random and truncated bytes through labelling.

The report and the contact sheets read whatever ``source`` a labels row names, with
the reader's credentials: they go through one bounded reader (labels.thumbnails).
The fuzz pass feeds random and cut-short bytes under every name labelling reads
and checks that each bad input is one error row and every good frame is labelled.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image
from test_labeling import png_claiming

from imagegen import class_image, encode, write_tar, write_video
from simpsons_ray.labels import thumbnails


def _tar_gz(path, members: list[tuple[str, bytes]]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(buffer.getvalue(), compresslevel=9))


def test_sources_are_read_through_one_bounded_reader(tmp_path, monkeypatch):
    """Only the kinds of source labelling writes are read, each within a size and pixel limit; the rest is refused in a sentence."""
    rng = np.random.default_rng(0)
    picture = encode(class_image(1, rng, 48), "PNG")
    (tmp_path / "good.png").write_bytes(picture)
    (tmp_path / "big.png").write_bytes(picture + b"\0" * 4096)
    (tmp_path / "secret.txt").write_text("not a picture: never read")
    (tmp_path / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    write_tar(str(tmp_path / "frames.tar"), {"f/0001.jpg": encode(class_image(2, rng, 48)), "f/0002.jpg": picture + b"\0" * 4096})
    # A .tar.gz whose first member inflates to 8 MiB of zeros (a few KB on disk), the wanted one after it.
    _tar_gz(tmp_path / "zeros.tar.gz", [("f/0001.jpg", b"\0" * (8 << 20)), ("f/0002.jpg", picture)])
    write_video(str(tmp_path / "v.mp4"), [class_image(0, rng, 48)] * 12, fps=12)
    monkeypatch.setattr(thumbnails, "MAX_SOURCE_BYTES", len(picture) + 100)
    monkeypatch.setattr(thumbnails, "MAX_ARCHIVE_BYTES", 1 << 20)
    sources = {
        "good": str(tmp_path / "good.png"),
        "big": str(tmp_path / "big.png"),
        "secret": str(tmp_path / "secret.txt"),
        "bomb": str(tmp_path / "bomb.png"),
        "member": f"{tmp_path / 'frames.tar'}#f/0001.jpg",
        "big member": f"{tmp_path / 'frames.tar'}#f/0002.jpg",
        "not an image member": f"{tmp_path / 'frames.tar'}#f/notes.txt",
        "inflates": f"{tmp_path / 'zeros.tar.gz'}#f/0002.jpg",
        "frame": f"{tmp_path / 'v.mp4'}#t=0.5",
        "no time": f"{tmp_path / 'v.mp4'}#t=nan",
    }
    said: list[str] = []
    found = thumbnails.fetch_sources(list(sources.values()), warn=said.append)
    shown = {k: thumbnails.thumbnail(found[v], (32, 32)) for k, v in sources.items()}
    assert {k for k, v in shown.items() if v is not None} == {"good", "member", "frame"}
    text = "\n".join(said)
    assert "big.png holds" in text and "over the" in text
    assert "secret.txt' is not an image file" in text
    assert "f/0002.jpg holds" in text
    assert "notes.txt' is not an image member" in text
    assert "runs past 1,048,576 bytes (inflated)" in text
    assert "names no time" in text


def test_a_png_bomb_is_refused_by_its_header_without_decoding(tmp_path):
    from simpsons_ray.media.images import ImageDecodeError, decode_rgb

    with pytest.raises(ImageDecodeError, match="pixel limit|decompression bomb"):
        decode_rgb(png_claiming(30_000, 30_000))
    image = Image.new("RGB", (4, 4))
    assert decode_rgb(encode(image, "PNG")).size == (4, 4)



# ------------------------------------------------------------------ fuzz through labelling
FUZZ_SEED = 26
FUZZ_PER_KIND = 2  # random and cut-short inputs of each kind: bounded, one labelling run for them all


def _fuzz_folder(root) -> dict[str, dict]:
    """Good frames beside random and cut-short bytes under every name labelling reads; what each must give."""
    rng = np.random.default_rng(FUZZ_SEED)
    expect: dict[str, dict] = {}
    good = root / "good"
    good.mkdir(parents=True)
    for i in range(6):
        (good / f"frame_{i:04d}.jpg").write_bytes(encode(class_image(i % 4, rng, 40)))
    for k in range(FUZZ_PER_KIND):
        picture = encode(class_image(k, rng, 40), "PNG")
        (good / f"frame_{10 + k:04d}.jpg").write_bytes(rng.bytes(int(rng.integers(1, 3000))))
        (good / f"frame_{20 + k:04d}.png").write_bytes(picture[: int(rng.integers(8, len(picture) - 8))])
    expect["good"] = {"frames": 6, "errors": 2 * FUZZ_PER_KIND}
    for k in range(FUZZ_PER_KIND):
        for suffix in (".mp4", ".mkv", ".tar", ".tar.gz"):
            (root / f"random{k}{suffix.replace('.', '-')}{suffix}").write_bytes(rng.bytes(int(rng.integers(0, 20000))))
            expect[f"random{k}{suffix.replace('.', '-')}"] = {"frames": 0, "errors": 1}
        members = {f"f/{i:04d}.jpg": encode(class_image(i % 4, rng, 40)) for i in range(8)}
        for suffix, gz in ((".tar", False), (".tar.gz", True)):
            whole = root / f"whole{k}{suffix}"
            write_tar(str(whole), members, gz=gz)
            data = whole.read_bytes()
            whole.unlink()
            name = f"cut{k}{suffix.replace('.', '-')}"
            (root / f"{name}{suffix}").write_bytes(data[: len(data) * (k + 1) // 3])
            expect[name] = {"frames": (0, 8), "errors": 1}  # a cut in the end blocks loses no member, and is still said
        video = root / f"whole{k}.mkv"
        write_video(str(video), [class_image(i // 6 % 4, rng, 48) for i in range(48)], fps=12)
        data = video.read_bytes()
        video.unlink()
        (root / f"cutvideo{k}.mkv").write_bytes(data[: len(data) * (k + 1) // 3])
        expect[f"cutvideo{k}"] = {"frames": (0, 15), "errors": 1}  # 4 s at 4 frames/s: 16 frames whole
    return expect


def _check_fuzz(output: str, summary: dict, expect: dict[str, dict]) -> None:
    import pyarrow.dataset as pads

    from simpsons_ray.labels import schema

    labels = schema.labels_dataset(output).to_table(columns=["episode", "source"]).to_pandas()
    errors = pads.dataset(os.path.join(output, schema.ERRORS_DIR), format="parquet").to_table().to_pandas()
    assert summary["episodes_labelled"] == len(expect), summary
    for episode, want in expect.items():
        frames, errs = (labels["episode"] == episode).sum(), (errors["episode"] == episode).sum()
        low, high = want["frames"] if isinstance(want["frames"], tuple) else (want["frames"], want["frames"])
        assert low <= frames <= high and errs == want["errors"], (episode, frames, errs, errors[errors["episode"] == episode])
    assert all(isinstance(e, str) and e and "\n" not in e for e in errors["error"])


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.slow)])  # S3 in the full suite
def test_fuzzed_inputs_are_one_error_row_each_and_every_good_frame_is_labelled(ray_session, shapes_model, tmp_path, where, request):
    from imagegen import upload_tree
    from simpsons_ray.label.config import LabelConfig
    from simpsons_ray.label.run import label

    folder = tmp_path / "frames"
    expect = _fuzz_folder(folder)
    frames, output = str(folder), str(tmp_path / "labels")
    if where == "s3":
        server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        frames = upload_tree(server.client(), bucket, str(folder), "fuzz")
    summary = label(LabelConfig(model_uri=shapes_model, frames_uri=frames, output_uri=output, sample_fps=4.0,
                                seconds_per_read_task=60.0))
    _check_fuzz(output, summary, expect)
