"""Labeling: frame dumps (folders, tar, tar.gz; local and S3) -> Parquet labels, exactly once.

The model is a resnet18 at 32 px trained here for a few seconds on generated shapes,
so its predictions are confident and a wrong label would show. Its labels in the
Parquet are checked against the same model run in a plain PIL + torchvision loop.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from fractions import Fraction

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from imagegen import (
    MULTI_MODEL_PX,
    SHAPE_CLASSES,
    SHAPE_FRAME_PX,
    SHAPE_MODEL_PX,
    characters_frame,
    class_image,
    encode,
    train_multilabel_shapes_model,
    upload_tree,
    write_tar,
    write_video,
)
from simpsons_ray.core.errors import UserError
from simpsons_ray.label import episodes as frames_lib
from simpsons_ray.label.commit import EpisodeWriter
from simpsons_ray.label.config import LabelConfig
from simpsons_ray.label.episodes import JPEG, PIXELS, frame_number, list_episodes
from simpsons_ray.label.ingest import decode_frames, route_frames
from simpsons_ray.label.leases import LeaseKeeper
from simpsons_ray.label.predictor import FramePredictor
from simpsons_ray.label.resources import decode_in_predictor, predictor_pool
from simpsons_ray.label.run import label
from simpsons_ray.label.settings import LabelSettings
from simpsons_ray.label.shots import SIGNATURE_SIZE
from simpsons_ray.labels import schema
from simpsons_ray.labels.layout import OutputLayout
from simpsons_ray.media import video
from simpsons_ray.model.artifact import load_artifact
from simpsons_ray.model.network import build_model, fold_batchnorm
from simpsons_ray.model.preprocess import PreprocessConfig, load_resized, normalize_array
from waiting import wait_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = SHAPE_CLASSES
IMAGE_SIZE = SHAPE_MODEL_PX
FRAME_PX = SHAPE_FRAME_PX


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(shapes_model) -> str:
    """A resnet18 at 32 px that tells the 4 shapes apart (imagegen.train_shapes_model)."""
    return shapes_model


def frame_bytes(rng: np.random.Generator, index: int, fmt: str = "JPEG") -> bytes:
    return encode(class_image(index % len(CLASSES), rng, FRAME_PX), fmt)


def make_dump(root: str, seed: int = 0, per_episode: int = 12) -> dict[str, dict[str, bytes]]:
    """A folder, a tar (frames in subfolders) and a tar.gz; returns {episode: {source suffix: bytes}}."""
    rng = np.random.default_rng(seed)
    dump: dict[str, dict[str, bytes]] = {}
    folder = {f"frame_{i:06d}.jpg": frame_bytes(rng, i) for i in range(per_episode)}
    os.makedirs(os.path.join(root, "S01E01"))
    for name, data in folder.items():
        with open(os.path.join(root, "S01E01", name), "wb") as f:
            f.write(data)
    dump["S01E01"] = folder
    tar = {f"{'a' if i % 2 else 'b'}/S01E02_{i:05d}.png": frame_bytes(rng, i + 1, "PNG") for i in range(per_episode)}
    write_tar(os.path.join(root, "S01E02.tar"), tar)
    dump["S01E02"] = tar
    targz = {f"frames/{i}.jpg": frame_bytes(rng, i + 2) for i in range(per_episode)}
    write_tar(os.path.join(root, "S01E03.tar.gz"), targz, gz=True)
    dump["S01E03"] = targz
    return dump


def reference_labels(model_dir: str, images: dict[str, bytes]) -> dict[str, tuple[str, float]]:
    """The model applied in a plain loop: PIL decode, torchvision transforms, forward."""
    from torchvision import transforms

    config = json.load(open(os.path.join(model_dir, "config.json")))
    classes = json.load(open(os.path.join(model_dir, "classes.json")))
    transform = transforms.Compose(
        [
            transforms.Resize((config["image_size"], config["image_size"]), interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.ToTensor(),
            transforms.Normalize(config["mean"], config["std"]),
        ]
    )
    model = load_artifact(model_dir).model
    out = {}
    with torch.inference_mode():
        for key, data in images.items():
            x = transform(Image.open(io.BytesIO(data)).convert("RGB")).unsqueeze(0)
            probs = model(x).softmax(1)[0]
            out[key] = (classes[int(probs.argmax())], float(probs.max()))
    return out


def read_labels(output: str):
    return schema.labels_dataset(output).to_table().to_pandas()


def read_errors(output: str):
    return pads.dataset(os.path.join(output, schema.ERRORS_DIR), format="parquet").to_table().to_pandas()


def label_files(output: str) -> dict[str, bytes]:
    found = {}
    for dirpath, _, files in os.walk(output):
        for name in files:
            if name.endswith(".parquet"):
                path = os.path.join(dirpath, name)
                found[os.path.relpath(path, output)] = open(path, "rb").read()
    return found


@pytest.fixture(scope="module")
def local_run(ray_session, model_dir, tmp_path_factory):
    """One labeling run over a local dump of three episodes (folder, tar, tar.gz)."""
    root = tmp_path_factory.mktemp("local")
    frames_dir, output = str(root / "frames"), str(root / "labels")
    dump = make_dump(frames_dir)
    summary = label(LabelConfig(model_uri=model_dir, frames_uri=frames_dir, output_uri=output, fps=25.0))
    return {"frames": frames_dir, "output": output, "dump": dump, "summary": summary}


# ----------------------------------------------------------------------- frame names
def test_frame_number_is_last_run_of_digits():
    assert frame_number("frame_000123.jpg") == 123
    assert frame_number("S01E02_0042.png") == 42
    assert frame_number("cam2/frame12_v3.jpg") == 3
    assert frame_number("frames/7.jpg") == 7
    assert frame_number("poster.jpg") is None


def test_list_episodes_folders_archives_and_filter(tmp_path):
    for name in ("S01E01", "S01E02", "_scratch", ".hidden"):
        (tmp_path / name).mkdir()
    write_tar(str(tmp_path / "S01E03.tar.gz"), {}, gz=True)
    write_tar(str(tmp_path / "S01E04.tar"), {})
    (tmp_path / "notes.txt").write_text("not an episode")
    episodes = list_episodes(str(tmp_path))
    assert [(e.episode_id, e.kind) for e in episodes] == [
        ("S01E01", "folder"), ("S01E02", "folder"), ("S01E03", "archive"), ("S01E04", "archive"),
    ]
    assert [e.episode_id for e in list_episodes(str(tmp_path), ("S01E04", "S01E01"))] == ["S01E01", "S01E04"]
    with pytest.raises(UserError, match="S09E09"):
        list_episodes(str(tmp_path), ("S09E09",))
    write_tar(str(tmp_path / "S01E01.tar"), {})
    with pytest.raises(UserError, match="appears twice"):
        list_episodes(str(tmp_path))


def test_sources_are_absolute_whatever_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "dump" / "S01E01").mkdir(parents=True)
    write_tar(str(tmp_path / "dump" / "S01E02.tar"), {})
    monkeypatch.chdir(tmp_path)
    uris = [e.uri for e in list_episodes("dump")]
    assert uris == [str(tmp_path / "dump" / "S01E01"), str(tmp_path / "dump" / "S01E02.tar")]


# ------------------------------------------------------------------------ happy path
def test_labels_have_exact_schema_and_match_a_plain_loop(local_run, model_dir):
    output, dump = local_run["output"], local_run["dump"]
    dataset = schema.labels_dataset(output)
    assert dataset.schema == schema.READ_SCHEMA
    for path in dataset.files:  # the files hold every column but the partition key
        assert pq.read_schema(path).remove_metadata() == schema.WRITTEN_FILE_SCHEMA

    df = read_labels(output)
    assert len(df) == sum(len(frames) for frames in dump.values())
    assert df["source"].is_unique
    expected_model_id = load_artifact(model_dir).model_id
    assert set(df["model_id"]) == {expected_model_id}

    frames_dir = local_run["frames"]
    expected_sources = {}
    for name in dump["S01E01"]:
        expected_sources[os.path.join(frames_dir, "S01E01", name)] = ("S01E01", dump["S01E01"][name], name)
    for eid, archive in (("S01E02", "S01E02.tar"), ("S01E03", "S01E03.tar.gz")):
        for member, data in dump[eid].items():
            expected_sources[f"{os.path.join(frames_dir, archive)}#{member}"] = (eid, data, member)
    assert set(df["source"]) == set(expected_sources)

    reference = reference_labels(model_dir, {src: data for src, (_, data, _) in expected_sources.items()})
    for row in df.itertuples():
        eid, _, name = expected_sources[row.source]
        assert row.episode == eid
        assert row.frame == frame_number(name)
        assert row.timestamp_s == pytest.approx(row.frame / 25.0)
        assert row.label == reference[row.source][0], row.source
        assert row.confidence == pytest.approx(reference[row.source][1], abs=1e-4)
        assert list(row.top_labels)[0] == row.label and len(row.top_labels) == 3
        assert list(row.top_scores) == sorted(row.top_scores, reverse=True)
        assert row.top_scores[0] == pytest.approx(row.confidence)
        # A single-label model names its top-1, which reaches the default --min-confidence (0) on every frame.
        assert list(row.frame_characters) == [row.label] and list(row.frame_character_scores) == [row.confidence]
    # A frame that is a shot of its own has nothing to pool with: its answer is its own.
    alone = df.groupby(["episode", "shot"])["frame"].transform("size") == 1
    assert alone.any()
    assert all(list(a) == list(b) for a, b in zip(df["characters"][alone], df["frame_characters"][alone]))
    # make_dump draws frame i of the n-th episode from class (i + n) % 4: the model should see that.
    offset = {"S01E01": 0, "S01E02": 1, "S01E03": 2}
    drawn = [CLASSES[(frame + offset[episode]) % len(CLASSES)] for frame, episode in zip(df["frame"], df["episode"])]
    assert (df["label"] == drawn).mean() > 0.8


def test_one_file_per_episode_and_a_saved_summary(local_run, model_dir):
    output, summary = local_run["output"], local_run["summary"]
    files = sorted(p for p in label_files(output) if not p.startswith("_"))
    assert files == [f"episode=S01E0{i}/part-0.parquet" for i in (1, 2, 3)]
    assert summary["frames_labelled"] == 36 and summary["errors"] == 0
    assert summary["episodes"] == 3 and summary["episodes_labelled"] == 3
    assert summary["model_id"] == load_artifact(model_dir).model_id
    assert summary["frames_per_s"] > 0 and summary["wall_time_s"] > 0
    saved = json.load(open(os.path.join(output, schema.RUNS_DIR, f"{summary['run_id']}.json")))
    assert saved["frames_labelled"] == 36
    assert not os.path.exists(os.path.join(output, schema.ERRORS_DIR))
    assert not any(files for _, _, files in os.walk(os.path.join(output, "_tmp")))


def test_rerun_is_a_no_op(local_run, model_dir):
    output = local_run["output"]
    before = label_files(output)
    summary = label(LabelConfig(model_uri=model_dir, frames_uri=local_run["frames"], output_uri=output, fps=25.0))
    assert summary["frames_labelled"] == 0 and summary["episodes_skipped"] == 3 and summary["episodes_labelled"] == 0
    assert label_files(output) == before


def test_episodes_of_a_live_job_are_left_to_it_and_changed_sources_are_reported(ray_session, model_dir, tmp_path):
    """Two jobs on one output: each skips what the other holds, and cleans only the files of runs that are dead."""
    frames_dir, output = str(tmp_path / "frames"), str(tmp_path / "labels")
    make_dump(frames_dir, seed=5, per_episode=4)
    other = LeaseKeeper(output, "job-other")  # a live job, labelling S01E02 right now
    assert other.acquire(["S01E02"])[0] == ["S01E02"]
    live_tmp = os.path.join(output, "_tmp", "job-other", "episode=S01E02.parquet")  # its file under way
    dead_tmp = os.path.join(output, "_tmp", "20260101T000000Z-dead00", "episode=S01E01.parquet")  # a killed run's
    for path in (live_tmp, dead_tmp):
        os.makedirs(os.path.dirname(path))
        with open(path, "wb") as f:
            f.write(b"PAR1 under way")
    cfg = dict(model_uri=model_dir, frames_uri=frames_dir, output_uri=output)

    summary = label(LabelConfig(**cfg))
    assert summary["episodes_held_elsewhere"] == ["S01E02"] and summary["episodes_labelled"] == 2
    assert set(read_labels(output)["episode"]) == {"S01E01", "S01E03"}
    assert os.path.exists(live_tmp) and not os.path.exists(os.path.dirname(dead_tmp))
    assert other.renew("S01E02") and not os.path.exists(os.path.join(output, "_leases", "S01E01.json"))

    # The other job ends without finishing; then a frame of S01E01 is replaced and the S01E03 archive rewritten.
    other.release(["S01E02"])
    with open(os.path.join(frames_dir, "S01E01", "frame_000000.jpg"), "wb") as f:
        f.write(frame_bytes(np.random.default_rng(99), 3))
    os.utime(os.path.join(frames_dir, "S01E03.tar.gz"), (1_000_000_000, 1_000_000_000))
    before = {k: v for k, v in label_files(output).items() if "S01E02" not in k}
    summary = label(LabelConfig(**cfg))
    assert summary["episodes_labelled"] == 1 and summary["episodes_stale"] == ["S01E01", "S01E03"]
    assert {k: v for k, v in label_files(output).items() if "S01E02" not in k} == before  # kept, only reported

    # The marker of the episode labelled just now fingerprints its source as it is.
    episode = next(e for e in list_episodes(frames_dir) if e.episode_id == "S01E02")
    assert json.load(open(os.path.join(output, "_progress", "S01E02.json")))["source_fingerprint"] == frames_lib.fingerprint(episode)
    df = read_labels(output)
    assert len(df) == 12 and df["source"].is_unique
    assert set(os.listdir(os.path.join(output, "_leases"))) == {".lock"} and not os.listdir(os.path.join(output, "_tmp"))
    # (--overwrite relabels them, as any episode: test_min_confidence_nulls_labels_and_changed_settings_need_overwrite.)


def test_predictor_fast_paths_agree_with_the_plain_model_on_cpu(model_dir):
    """Folded BatchNorm and channels_last (the defaults), and bf16 autocast (the GPU setting), against plain fp32."""
    rng = np.random.default_rng(5)
    config = PreprocessConfig(image_size=IMAGE_SIZE)
    x = normalize_array(np.stack([load_resized(frame_bytes(rng, i), IMAGE_SIZE) for i in range(32)]), config)  # NHWC
    with torch.inference_mode():
        reference = load_artifact(model_dir).model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).softmax(1)
    ref_scores, ref_idx = (t.numpy() for t in reference.topk(3, dim=1))

    default = FramePredictor(model_dir, top_k=3, device="cpu")
    assert default.channels_last and not default.mixed_precision
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in default.model.modules())
    assert default.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    scores, idx = default.predict(x)
    assert scores.dtype == np.float32 and idx.shape == (32, 3)
    np.testing.assert_array_equal(idx[:, 0], ref_idx[:, 0])
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)

    bf16 = FramePredictor(model_dir, top_k=3, device="cpu", mixed_precision=True)
    bf16_scores, bf16_idx = bf16.predict(x)
    assert (bf16_idx[:, 0] == ref_idx[:, 0]).mean() >= 0.9
    assert np.abs(bf16_scores[:, 0] - ref_scores[:, 0]).max() < 0.1


def test_predictor_applies_the_artifacts_temperature_and_flip_tta(model_dir, tmp_path):
    """Confidence as calibrated in training: softmax(mean of image and mirror logits / T)."""
    calibrated = tmp_path / "calibrated"
    shutil.copytree(model_dir, calibrated)
    config = json.loads((calibrated / "config.json").read_text())
    (calibrated / "config.json").write_text(json.dumps(config | {"temperature": 2.5, "tta_flip": True}))
    rng = np.random.default_rng(6)
    x = normalize_array(np.stack([load_resized(frame_bytes(rng, i), IMAGE_SIZE) for i in range(16)]),
                        PreprocessConfig(image_size=IMAGE_SIZE))
    model = load_artifact(model_dir).model
    with torch.inference_mode():
        nchw = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        reference = ((model(nchw) + model(nchw.flip(3))) / 2 / 2.5).softmax(1)
    ref_scores, ref_idx = (t.numpy() for t in reference.topk(3, dim=1))
    scores, idx = FramePredictor(str(calibrated), top_k=3, device="cpu").predict(x)
    np.testing.assert_array_equal(idx[:, 0], ref_idx[:, 0])
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    plain_scores, _ = FramePredictor(model_dir, top_k=3, device="cpu").predict(x)
    assert plain_scores[:, 0].mean() > scores[:, 0].mean()  # T > 1 tempers an overconfident model


def test_predictor_pool_is_elastic_where_the_cluster_can_grow():
    config = LabelConfig(model_uri="m", frames_uri="f", output_uri="o")
    pool = predictor_pool(config, cluster_cpus=2)
    # Starts with one single-threaded actor per CPU there is now, and may grow without limit.
    assert (pool.min_size, pool.initial, pool.max_size, pool.predictor_args["cpu_threads"], pool.resources["num_cpus"]) == (2, 2, None, 1, 0.5)
    strategy = pool.strategy()
    assert (strategy.min_size, strategy.initial_size, strategy.max_size) == (2, 2, float("inf"))
    # A cluster whose workers start at zero (a head with no CPUs): one actor to start, still unbounded.
    empty = predictor_pool(config, cluster_cpus=0)
    assert (empty.min_size, empty.initial, empty.max_size) == (1, 1, None)
    pool = predictor_pool(dataclasses.replace(config, num_workers=1), cluster_cpus=8)
    assert (pool.initial, pool.max_size, pool.predictor_args["cpu_threads"], pool.resources["num_cpus"]) == (1, 1, 8, 0.5)
    pool = predictor_pool(dataclasses.replace(config, num_workers=4), cluster_cpus=2)
    assert pool.initial == 2 and pool.max_size * pool.resources["num_cpus"] <= 1.0  # decode tasks keep half the CPUs
    pool = predictor_pool(dataclasses.replace(config, use_gpu=True), cluster_cpus=8, cluster_gpus=2)
    assert (pool.initial, pool.max_size, pool.predictor_args["device"], pool.resources["num_gpus"]) == (2, None, "cuda", 1)
    pool = predictor_pool(dataclasses.replace(config, use_gpu=True, num_workers=3), cluster_cpus=8, cluster_gpus=0)
    assert (pool.initial, pool.max_size) == (1, 3)  # GPUs the autoscaler has yet to add
    # A local Ray never gains a CPU: the pool stays the size it starts with.
    fixed = predictor_pool(config, cluster_cpus=2, grow=False)
    assert (fixed.min_size, fixed.initial, fixed.max_size) == (2, 2, 2) and fixed.strategy().max_size == 2
    # Another job holds most of the cluster: start small, grow when it lets go.
    assert predictor_pool(config, cluster_cpus=6, free_cpus=1.25).initial == 1
    assert predictor_pool(config, cluster_cpus=6, free_cpus=3.0).initial == 4
    assert predictor_pool(dataclasses.replace(config, use_gpu=True), cluster_cpus=8, cluster_gpus=4, free_gpus=1).initial == 1


def test_read_and_decode_tasks_do_not_import_torch():
    """Ray starts a process for them; without torch it starts seconds sooner."""
    code = "import sys, simpsons_ray.label.ingest; print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_decoding_in_the_predictor_matches_the_cpu_tasks(model_dir):
    """The --gpu default path (JPEG bytes decoded by the predictor), run with decode_jpeg on the CPU.

    nvJPEG and libjpeg differ by a level or two per pixel, and so do torch's and
    PIL's antialiased resizes; labels must not change, scores barely.
    """
    rng = np.random.default_rng(21)
    frames = [frame_bytes(rng, i) for i in range(24)] + [frame_bytes(rng, i, "PNG") for i in range(4)]
    grey = encode(Image.open(io.BytesIO(frames[0])).convert("L"), "JPEG")
    good = frames[5]
    body_corrupt = good[:300] + bytes(len(good) - 302) + good[-2:]  # valid header and end marker, no image data
    frames += [grey, good[: len(good) // 2], body_corrupt, b"\xff\xd8\xff not a jpeg"]
    n = len(frames)
    batch = {"episode": np.array(["E"] * n, dtype=object), "task": np.zeros(n, np.int64), "task_end": np.zeros(n, np.int64),
             "source": np.array([f"s{i}" for i in range(n)], dtype=object), "frame": np.arange(n),
             "data": np.array(frames, dtype=object), "error": np.array([""] * n, dtype=object),
             "timestamp": np.full(n, np.nan), "fingerprint": np.array([""] * n, dtype=object), "encoding": np.array([""] * n, dtype=object)}
    config = PreprocessConfig(image_size=IMAGE_SIZE)
    routed = route_frames(batch, config)
    assert list(routed["encoding"][:24]) == [JPEG] * 24 and list(routed["encoding"][24:28]) == [PIXELS] * 4
    assert routed["encoding"][28] == JPEG  # greyscale JPEGs decode on the device too
    assert routed["encoding"][29] == PIXELS or routed["error"][29]  # truncated: no end marker, PIL's turn
    in_predictor = FramePredictor(model_dir, top_k=3, device="cpu", decode=True)(routed)
    in_tasks = FramePredictor(model_dir, top_k=3, device="cpu")(decode_frames(batch, config))

    errors = in_predictor["error"]
    assert not any(errors[:29]), errors[:29]
    assert errors[29] and errors[31]  # truncated, and not a JPEG at all: errors from PIL, as in the tasks path
    assert errors[30].startswith("cannot decode image")  # found by decode_jpeg, the other frames still scored
    assert all(in_tasks["error"][29:] != "") and not any(in_tasks["error"][:29])
    np.testing.assert_array_equal(in_predictor["top_indices"][:29, 0], in_tasks["top_indices"][:29, 0])
    np.testing.assert_allclose(in_predictor["top_scores"][:29], in_tasks["top_scores"][:29], atol=0.02)
    assert (in_predictor["top_indices"][29:] == -1).all()


def test_decode_choice():
    config = LabelConfig(model_uri="m", frames_uri="f", output_uri="o")
    assert not decode_in_predictor(config)
    assert decode_in_predictor(dataclasses.replace(config, use_gpu=True))  # nvJPEG when there is a GPU
    assert not decode_in_predictor(dataclasses.replace(config, use_gpu=True, decode="tasks"))
    assert decode_in_predictor(dataclasses.replace(config, decode="predictor"))


def test_folding_batchnorm_keeps_the_outputs(tmp_path):
    """Both block types (resnet18's BasicBlock, resnet50's Bottleneck) with non-trivial BN statistics."""
    torch.manual_seed(0)
    for arch in ("resnet18", "resnet50"):
        model = build_model(arch, 5).eval()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
        folded = fold_batchnorm(model)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
        x = torch.randn(2, 3, 48, 48)
        with torch.inference_mode():
            torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)


def test_weights_that_are_not_the_artifacts_are_refused(model_dir, local_run, tmp_path):
    swapped = str(tmp_path / "model")
    shutil.copytree(model_dir, swapped)
    torch.save(build_model("resnet18", len(CLASSES), head_hidden=64, dropout=0.0).state_dict(), os.path.join(swapped, "model.pt"))
    model_id = json.load(open(os.path.join(model_dir, "config.json")))["model_id"]
    with pytest.raises(UserError, match="weights changed"):
        label(LabelConfig(model_uri=swapped, frames_uri=local_run["frames"], output_uri=str(tmp_path / "out")))
    assert not os.path.exists(tmp_path / "out" / "episode=S01E01")
    with pytest.raises(UserError, match="weights changed"):  # and in the actor, should they change mid-run
        FramePredictor(swapped, top_k=3, expected_model_id=model_id)


# --------------------------------------------------------------------------- S3
@pytest.mark.slow
def test_s3_frames_model_and_output(ray_session, model_dir, s3_server, s3_bucket, tmp_path):
    frames_dir = str(tmp_path / "frames")
    dump = make_dump(frames_dir, seed=3, per_episode=6)
    client = s3_server.client()
    frames_uri = upload_tree(client, s3_bucket, frames_dir, "dumps/season1")
    model_uri = upload_tree(client, s3_bucket, model_dir, "models/m1")
    output = f"s3://{s3_bucket}/labels"
    # A run killed while it uploaded a large labels file: its multipart upload is still open (and billed).
    upload = client.create_multipart_upload(Bucket=s3_bucket, Key="labels/_tmp/20260101T000000Z-dead00/episode=S01E01.parquet")
    client.upload_part(Bucket=s3_bucket, Key=upload["Key"], UploadId=upload["UploadId"], PartNumber=1, Body=b"PAR1" * 1000)
    summary = label(LabelConfig(model_uri=model_uri, frames_uri=frames_uri, output_uri=output, top_k=2))
    assert summary["frames_labelled"] == 18 and summary["errors"] == 0
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []

    table = schema.labels_dataset(output).to_table()
    assert table.schema == schema.READ_SCHEMA
    df = table.to_pandas()
    assert len(df) == 18 and df["source"].is_unique
    assert df["timestamp_s"].isna().all()  # no --fps
    assert all(len(t) == 2 for t in df["top_labels"])
    tar_row = df[df["episode"] == "S01E02"].iloc[0]
    assert tar_row["source"].startswith(f"{frames_uri}/S01E02.tar#")
    reference = reference_labels(model_dir, {f"{frames_uri}/S01E01/{n}": d for n, d in dump["S01E01"].items()})
    for row in df[df["episode"] == "S01E01"].itertuples():
        assert row.label == reference[row.source][0]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="labels/")["Contents"]}
    assert {f"labels/episode=S01E0{i}/part-0.parquet" for i in (1, 2, 3)} <= keys
    assert not any(k.startswith("labels/_tmp/") and k.endswith(".parquet") for k in keys)

    again = label(LabelConfig(model_uri=model_uri, frames_uri=frames_uri, output_uri=output, top_k=2))
    assert again["frames_labelled"] == 0 and again["episodes_skipped"] == 3


# ------------------------------------------------------------------------ bad input
def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: a decompression bomb by header."""
    data = bytearray(encode(Image.new("RGB", (8, 8)), "PNG"))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def test_decoding_in_many_threads_touches_no_global_state():
    """Decode tasks decode in threads: truncated files and bombs fail each on its own, good ones decode, and
    neither PIL's settings nor the warnings filters change (the old decode set one and swapped the other per call)."""
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    from PIL import ImageFile

    from simpsons_ray.media.images import ImageDecodeError, decode_rgb

    rng = np.random.default_rng(2)
    good = [encode(class_image(i % 4, rng, 64), "JPEG") for i in range(40)]
    inputs = [(g, "ok") for g in good] + [(g[: len(g) // 2], "truncated") for g in good[:20]]
    inputs += [(png_claiming(100_000, 100_000), "bomb")] * 10
    filters = list(warnings.filters)

    def one(item):
        data, kind = item
        try:
            return kind, decode_rgb(data).size
        except ImageDecodeError as exc:
            return kind, str(exc)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, inputs * 3))
    assert all(r == (64, 64) for kind, r in results if kind == "ok")
    assert all(isinstance(r, str) and "cannot decode" in r for kind, r in results if kind == "truncated")
    assert all(isinstance(r, str) and ("pixel limit" in r or "decompression bomb" in r) for kind, r in results if kind == "bomb")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False and warnings.filters == filters


def mode_image(mode: str, rng: np.random.Generator) -> bytes:
    rgb = class_image(1, rng, FRAME_PX)
    if mode == "CMYK":
        return encode(rgb.convert("CMYK"), "JPEG")
    if mode == "I;16":
        return encode(Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 256)), "PNG")
    if mode == "P":
        return encode(rgb.convert("P", palette=Image.ADAPTIVE), "PNG")
    return encode(rgb.convert(mode), "PNG")


def test_episodes_whose_names_are_not_ids_are_refused_and_nothing_is_written_for_them(ray_session, model_dir, tmp_path):
    """A folder "100%" (hive would decode it), an archive "x=y.tar" and "<b>.tar" beside a good episode: listed, never written."""
    frames = tmp_path / "frames"
    rng = np.random.default_rng(8)
    for name in ("good", "100%"):
        (frames / name).mkdir(parents=True)
        for i in range(3):
            (frames / name / f"frame_{i:04d}.jpg").write_bytes(frame_bytes(rng, i))
    for name in ("x=y.tar", "<b>.tar"):
        write_tar(str(frames / name), {f"f/{i:05d}.jpg": frame_bytes(rng, i) for i in range(3)})
    output = tmp_path / "labels"
    summary = label(LabelConfig(model_uri=model_dir, frames_uri=str(frames), output_uri=str(output)))
    assert summary["episodes_labelled"] == 1 and summary["frames_labelled"] == 3
    assert sorted(r.split(":")[0] for r in summary["episodes_refused"]) == ["100%", "<b>.tar", "x=y.tar"]
    written = sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file() and "_runs" not in str(p))
    assert written == ["_leases/.lock", "_progress/good.json", "episode=good/part-0.parquet"]  # .lock: leases' compare-and-swap
    with pytest.raises(UserError, match="--episodes '100%' is not an episode id .*may not hold '%'"):
        label(LabelConfig(model_uri=model_dir, frames_uri=str(frames), output_uri=str(output), episodes=("100%",)))


@pytest.mark.parametrize("decode", ["tasks", "predictor"])
def test_bad_members_are_error_rows_and_good_frames_still_labelled(ray_session, model_dir, tmp_path, decode):
    rng = np.random.default_rng(7)
    frames_dir, output = tmp_path / "frames", str(tmp_path / "labels")
    good = frame_bytes(rng, 0)
    folder = frames_dir / "E1"
    folder.mkdir(parents=True)
    files = {
        "frame_0001.jpg": good,
        "frame_0002.jpg": b"this is not a jpeg",  # corrupt
        "frame_0003.jpg": good[: len(good) // 2],  # truncated
        "frame_0004.png": b"",  # empty
        "frame_0005.png": png_claiming(100_000, 100_000),  # bomb by header
        "notes.txt": b"shot list",  # stray non-image
        "poster.jpg": good,  # no frame number
    }
    for i, mode in enumerate(("L", "LA", "RGBA", "P", "CMYK", "I;16"), start=10):
        files[f"frame_{i:04d}.png"] = mode_image(mode, rng)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    members = {
        "x/frame_01.jpg": good,
        "x/frame_02.jpg": b"\xff\xd8\xff garbage",
        "y/frame_03.png": b"",
        "README.md": b"hello",
        "y/frame_04.jpg": good,
    }
    write_tar(str(frames_dir / "E2.tar"), members)
    write_tar(str(frames_dir / "E3.tar"), {})  # empty archive
    # A tar.gz cut short: the frames before the cut are labelled, the cut is an error.
    write_tar(str(tmp_path / "whole.tar.gz"), {f"f_{i:03d}.png": encode(class_image(i % 4, rng, 200), "PNG") for i in range(12)}, gz=True)
    whole = (tmp_path / "whole.tar.gz").read_bytes()
    (frames_dir / "E4.tar.gz").write_bytes(whole[: int(len(whole) * 0.6)])

    summary = label(LabelConfig(model_uri=model_dir, frames_uri=str(frames_dir), output_uri=output, decode=decode))
    df = read_labels(output)
    errors = read_errors(output)
    assert list(errors.columns) == schema.ERRORS_SCHEMA.names
    by_source = dict(zip(errors["source"], errors["error"]))

    f = lambda name: str(folder / name)  # noqa: E731
    labelled = set(df["source"])
    good_folder = {f("frame_0001.jpg")} | {f(f"frame_{i:04d}.png") for i in range(10, 16)}
    assert good_folder <= labelled  # every mode converted and labelled
    assert "cannot decode" in by_source[f("frame_0002.jpg")]
    assert f("frame_0003.jpg") in by_source
    assert "empty" in by_source[f("frame_0004.png")]
    assert "pixels" in by_source[f("frame_0005.png")]  # refused by its header, never decoded
    assert "not an image" in by_source[f("notes.txt")]
    assert "frame number" in by_source[f("poster.jpg")]

    e2 = str(frames_dir / "E2.tar")
    assert {f"{e2}#x/frame_01.jpg", f"{e2}#y/frame_04.jpg"} <= labelled
    assert {f"{e2}#x/frame_02.jpg", f"{e2}#y/frame_03.png", f"{e2}#README.md"} <= set(by_source)
    assert "empty archive" in by_source[str(frames_dir / "E3.tar")]
    assert "E3" in summary["empty_episodes"]

    e4 = df[df["episode"] == "E4"]
    assert 0 < len(e4) < 12
    assert any("unreadable archive" in e for s, e in by_source.items() if s.startswith(str(frames_dir / "E4.tar.gz")))

    assert set(errors["episode"]) == {"E1", "E2", "E3", "E4"}
    assert summary["errors"] == len(errors) and summary["frames_labelled"] == len(df)
    assert len(df) + len(errors) == len(set(df["source"]) | set(errors["source"]))  # no source twice


# ------------------------------------------------------------------ confidence, flags
def test_min_confidence_nulls_labels_and_changed_settings_need_overwrite(local_run, model_dir, tmp_path):
    confidences = read_labels(local_run["output"])["confidence"]
    threshold = float(np.median(confidences))
    output = str(tmp_path / "labels")
    cfg = dict(model_uri=model_dir, frames_uri=local_run["frames"], output_uri=output)
    label(LabelConfig(**cfg, min_confidence=threshold, episodes=("S01E01", "S01E03")))
    df = read_labels(output)
    assert set(df["episode"]) == {"S01E01", "S01E03"}
    low = df["confidence"] < threshold
    assert low.any() and (~low).any()
    assert df.loc[low, "label"].isna().all()
    assert (df.loc[~low, "label"] == [t[0] for t in df.loc[~low, "top_labels"]]).all()
    # characters: [top-1] from --min-confidence up, [] (nobody, not null) below it.
    assert [list(c) for c in df.loc[low, "frame_characters"]] == [[]] * low.sum()
    assert [list(c) for c in df.loc[~low, "frame_characters"]] == [[label] for label in df.loc[~low, "label"]]

    with pytest.raises(UserError, match="--overwrite"):
        label(LabelConfig(**cfg, episodes=("S01E01",)))
    summary = label(LabelConfig(**cfg, episodes=("S01E01",), overwrite=True))
    assert summary["episodes_labelled"] == 1
    df = read_labels(output)
    assert df.loc[df["episode"] == "S01E01", "label"].notna().all()
    assert df.loc[df["episode"] == "S01E03", "label"].isna().any()  # untouched
    assert df["source"].is_unique


# ------------------------------------------------------------ every character on screen
def _written_rows(tmp_path, settings: LabelSettings, scores: np.ndarray, multilabel: bool) -> list[dict]:
    """One episode's rows as EpisodeWriter lands them, for scores ranked as FramePredictor ranks them."""
    n = len(scores)
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :2]  # FramePredictor.top_k_of: ties in class order
    batch = {"frame": np.arange(n), "timestamp": np.full(n, np.nan), "source": np.array([f"s{i}" for i in range(n)], dtype=object),
             "error": np.array([""] * n, dtype=object), "top_indices": ranked, "top_scores": np.take_along_axis(scores, ranked, 1)}
    batch["scores"] = scores
    batch["signature"] = np.zeros((n, SIGNATURE_SIZE), np.float32)
    episode = frames_lib.Episode("E1", "x", frames_lib.FOLDER)
    writer = EpisodeWriter(OutputLayout(str(tmp_path)), "run-1", episode, ["a", "b", "c", "d"],
                           dataclasses.replace(settings, multilabel=multilabel))
    writer.add(batch)
    writer.stage()
    writer.land("run-1", "", still_held=lambda: True)
    table = pq.read_table(tmp_path / "episode=E1" / "part-0.parquet")
    assert table.schema.remove_metadata() == schema.WRITTEN_FILE_SCHEMA
    # The frame's own answer (a frame's answer pooled over its shot is test_pooling's).
    return table.select(["label", "frame_characters", "frame_character_scores"]).rename_columns(
        ["label", "characters", "character_scores"]).to_pylist()


def test_characters_are_every_score_at_its_threshold_best_first(tmp_path):
    scores = np.array([  # values float32 holds exactly, so "reaches" is exact
        [0.875, 0.25, 0.625, 0.125],  # a and c reach theirs
        [0.25, 0.375, 0.125, 0.0],  # nobody: b's 0.375 is under its 0.4375
        [1.0, 1.0, 0.0, 1.0],  # saturated sigmoids tie: class order, as top_labels
        [0.5, 0.0, 0.0, 0.9375],  # the top-1, d, misses its own threshold: no label, yet a is on screen (at its threshold)
    ], np.float32)
    own = LabelSettings("m", 2, None, thresholds=(0.5, 0.4375, 0.5625, 0.96875))
    rows = _written_rows(tmp_path / "own", own, scores, multilabel=True)
    assert [(r["label"], r["characters"]) for r in rows] == [("a", ["a", "c"]), (None, []), ("a", ["a", "b", "d"]), (None, ["a"])]
    assert [r["character_scores"] for r in rows] == [[0.875, 0.625], [], [1.0, 1.0, 1.0], [0.5]]

    # A given --min-confidence replaces every threshold of the model.
    given = LabelSettings("m", 2, 0.9375, thresholds=own.thresholds)
    rows = _written_rows(tmp_path / "given", given, scores, multilabel=True)
    assert [(r["label"], r["characters"]) for r in rows] == [(None, []), (None, []), ("a", ["a", "b", "d"]), ("d", ["d"])]
    # A single-label model names its top-1 when it reaches --min-confidence.
    rows = _written_rows(tmp_path / "single", LabelSettings("m", 2, 0.625), scores, multilabel=False)
    assert [(r["label"], r["characters"]) for r in rows] == [("a", ["a"]), (None, []), ("a", ["a"]), ("d", ["d"])]

    # The markers: the model's thresholds are compared while they are in use, a given --min-confidence otherwise.
    marker = json.load(open(tmp_path / "own" / "_progress" / "E1.json"))
    assert marker["min_confidence"] is None and marker["thresholds"] == [0.5, 0.4375, 0.5625, 0.96875]
    assert own.differences(marker, frames_lib.FOLDER) == []
    assert given.differences(marker, frames_lib.FOLDER) == ["min_confidence None (now 0.9375)"]
    assert dataclasses.replace(own, thresholds=(0.5, 0.4375, 0.5625, 0.9)).differences(marker, frames_lib.FOLDER)
    single = json.load(open(tmp_path / "single" / "_progress" / "E1.json"))
    assert "thresholds" not in single and LabelSettings("m", 2, 0.625).differences(single, frames_lib.FOLDER) == []


MULTI_FRAMES = {  # episode -> the characters (SHAPE_CLASSES indices) on each frame
    "S01E01": [(), (0,), (1, 2), (3,), (0, 3)],
    "S01E02": [(2,), (), (1,), (2, 3), (0, 1)],
}


@pytest.fixture(scope="module")
def multilabel_model(tmp_path_factory) -> str:
    """A multi-label resnet18 at 32 px: a sigmoid per character, with per-character thresholds (imagegen)."""
    return train_multilabel_shapes_model(str(tmp_path_factory.mktemp("multilabel_model")))


def test_a_multilabel_model_lists_every_character_on_screen(ray_session, multilabel_model, tmp_path):
    import duckdb

    frames_dir, output = tmp_path / "frames", str(tmp_path / "labels")
    rng = np.random.default_rng(3)
    drawn = {}
    for episode, frames in MULTI_FRAMES.items():
        (frames_dir / episode).mkdir(parents=True)
        for i, present in enumerate(frames):
            data = encode(characters_frame(list(present), rng, cells=[(i + 2 * j) % 4 for j in range(len(present))], radius=0.21))
            (frames_dir / episode / f"frame_{i:06d}.jpg").write_bytes(data)
            drawn[str(frames_dir / episode / f"frame_{i:06d}.jpg")] = ({CLASSES[k] for k in present}, data)
    config = json.load(open(os.path.join(multilabel_model, "config.json")))
    thresholds = dict(zip(CLASSES, config["thresholds"]))
    # The model as trained, in a plain loop: sigmoid(logit / T). Far from every threshold, or the test proves nothing.
    model = load_artifact(multilabel_model).model
    pixels = np.stack([load_resized(data, MULTI_MODEL_PX) for _, data in drawn.values()])
    with torch.inference_mode():
        x = torch.from_numpy(normalize_array(pixels, PreprocessConfig(image_size=MULTI_MODEL_PX))).permute(0, 3, 1, 2)
        reference = dict(zip(drawn, (model(x) / config["temperature"]).sigmoid().numpy()))
    for source, scores in reference.items():
        margins = [abs(scores[k] - thresholds[c]) for k, c in enumerate(CLASSES)]
        assert min(margins) > 0.1, f"the multi-label test model is unsure of {source}: {scores} against {thresholds}"

    summary = label(LabelConfig(model_uri=multilabel_model, frames_uri=str(frames_dir), output_uri=output))
    assert summary["frames_labelled"] == 10 and summary["errors"] == 0
    dataset = schema.labels_dataset(output)
    assert dataset.schema == schema.READ_SCHEMA
    assert all(pq.read_schema(path).remove_metadata() == schema.WRITTEN_FILE_SCHEMA for path in dataset.files)
    rows = dataset.to_table().to_pylist()
    assert sorted(row["source"] for row in rows) == sorted(drawn)
    for row in rows:
        characters, scores = row["frame_characters"], row["frame_character_scores"]
        assert set(characters) == drawn[row["source"]][0] and len(characters) == len(drawn[row["source"]][0]), row
        assert scores == sorted(scores, reverse=True)
        assert scores == pytest.approx([reference[row["source"]][CLASSES.index(c)] for c in characters], abs=1e-4)
        assert row["top_labels"][: len(characters)] == characters
        # The top-1 is the label: every character here is far above its threshold, and nobody means null.
        assert row["label"] == (characters[0] if characters else None)

    # The marker keeps the model's thresholds: the same run again is a no-op, another --min-confidence is noticed.
    marker = json.load(open(os.path.join(output, "_progress", "S01E01.json")))
    assert marker["min_confidence"] is None and marker["thresholds"] == config["thresholds"]
    again = label(LabelConfig(model_uri=multilabel_model, frames_uri=str(frames_dir), output_uri=output))
    assert again["frames_labelled"] == 0 and again["episodes_skipped"] == 2
    with pytest.raises(UserError, match="min_confidence None .now 0.5.*--overwrite"):
        label(LabelConfig(model_uri=multilabel_model, frames_uri=str(frames_dir), output_uri=output, min_confidence=0.5))

    # DuckDB reads the hive-partitioned output as it is: list types, and one row per character on screen.
    files = f"{output}/episode=*/*.parquet"
    read = f"read_parquet('{files}', hive_partitioning = true, hive_types = {{'episode': VARCHAR}})"
    types = dict(duckdb.sql(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {read})").fetchall())
    assert (types["characters"], types["character_scores"]) == ("VARCHAR[]", "FLOAT[]")
    counted = duckdb.sql(f"SELECT episode, character, count(*) FROM (SELECT episode, unnest(frame_characters) AS character FROM {read}) "
                         "GROUP BY ALL").fetchall()
    expected = {}
    for episode, frames in MULTI_FRAMES.items():
        for present in frames:
            for k in present:
                expected[(episode, CLASSES[k])] = expected.get((episode, CLASSES[k]), 0) + 1
    assert {(e, c): n for e, c, n in counted} == expected

    # An output that also holds a file from before these columns: pyarrow reads them null, DuckDB by name.
    mixed = tmp_path / "mixed"
    shutil.copytree(output, mixed, ignore=shutil.ignore_patterns("_*"))
    old = pq.read_table(mixed / "episode=S01E02" / "part-0.parquet").drop_columns(["characters", "character_scores"])
    pq.write_table(old, mixed / "episode=S01E02" / "part-0.parquet")
    table = schema.labels_dataset(str(mixed)).to_table(columns=["episode", "characters"])
    assert table.filter(pads.field("episode") == "S01E02")["characters"].null_count == 5
    assert table.filter(pads.field("episode") == "S01E01")["characters"].null_count == 0
    read_mixed = f"read_parquet('{mixed}/episode=*/*.parquet', hive_partitioning = true, union_by_name = true)"
    assert duckdb.sql(f"SELECT count(*) FROM {read_mixed} WHERE characters IS NULL").fetchall() == [(5,)]

    # A multi-label model saved without thresholds needs --min-confidence, said before any work.
    bare = tmp_path / "bare"
    shutil.copytree(multilabel_model, bare)
    (bare / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "thresholds"}))
    with pytest.raises(UserError, match="without a threshold.*--min-confidence"):
        label(LabelConfig(model_uri=str(bare), frames_uri=str(frames_dir), output_uri=str(tmp_path / "bare_labels")))


def test_user_errors_before_any_work(model_dir, local_run, tmp_path):
    frames = local_run["frames"]
    out = str(tmp_path / "out")
    with pytest.raises(UserError, match="does not exist"):
        label(LabelConfig(model_uri=model_dir, frames_uri=str(tmp_path / "nope"), output_uri=out))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="No episodes"):
        label(LabelConfig(model_uri=model_dir, frames_uri=str(tmp_path / "empty"), output_uri=out))
    with pytest.raises(UserError, match="not a simpsons-ray model"):
        label(LabelConfig(model_uri=frames, frames_uri=frames, output_uri=out))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="Cannot write"):
        label(LabelConfig(model_uri=model_dir, frames_uri=frames, output_uri=str(tmp_path / "a_file" / "labels")))
    assert not os.path.exists(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the point is a cluster without GPUs")
def test_gpu_flag_waits_for_gpus_then_fails_in_one_sentence_before_any_work(ray_session, model_dir, local_run, tmp_path, caplog):
    """A joined cluster may autoscale: --gpu asks for a GPU and waits --wait-for-gpus seconds, then fails, having written nothing."""
    out = str(tmp_path / "out")
    started = time.monotonic()
    with caplog.at_level("INFO", logger="simpsons_ray.label"), pytest.raises(UserError) as failure:
        label(LabelConfig(model_uri=model_dir, frames_uri=local_run["frames"], output_uri=out, use_gpu=True, wait_for_gpus=2))
    assert time.monotonic() - started >= 2
    message = str(failure.value)
    assert "no GPU joined the Ray cluster within 2 s (--wait-for-gpus)" in message and "\n" not in message
    assert "waiting up to 2 s" in caplog.text
    assert not any(name.startswith("episode=") for name in os.listdir(out))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the point is a cluster without GPUs")
def test_gpu_flag_on_a_local_ray_started_by_the_job_fails_at_once(ray_session):
    """A local Ray cannot grow: no waiting there, and none with --wait-for-gpus 0."""
    from simpsons_ray.label.resources import check_resources

    config = LabelConfig(model_uri="m", frames_uri="f", output_uri="o", use_gpu=True)
    started = time.monotonic()
    with pytest.raises(UserError, match="the Ray cluster has no GPU"):
        check_resources(config, can_autoscale=False)
    with pytest.raises(UserError, match="the Ray cluster has no GPU"):
        check_resources(dataclasses.replace(config, wait_for_gpus=0), can_autoscale=True)
    assert time.monotonic() - started < 1
    check_resources(dataclasses.replace(config, use_gpu=False), can_autoscale=False)  # CPU runs need nothing


def test_cli_prints_one_sentence_and_exits_2(model_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "jobs", "label.py"), "--model", model_dir, "--frames", str(tmp_path / "missing"),
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "does not exist" in lines[0], result.stderr


# ------------------------------------------------------------------ kill and resume
@pytest.mark.slow
def test_killed_run_resumes_with_exactly_one_row_per_frame(ray_session, model_dir, tmp_path):
    rng = np.random.default_rng(11)
    frames_dir, output = tmp_path / "frames", str(tmp_path / "labels")
    frames_dir.mkdir()
    expected = set()
    for e in range(8):
        # 300 frames: more than one decode batch per archive, so that episodes commit one by one.
        members = {f"f/{i:05d}.jpg": frame_bytes(rng, i) for i in range(300)}
        write_tar(str(frames_dir / f"E{e}.tar"), members)
        expected |= {f"{frames_dir / f'E{e}.tar'}#{m}" for m in members}
    for v in range(2):  # and two videos, sampled at the default rate
        path = str(frames_dir / f"V{v}.mkv")
        write_video(path, [class_image(i // 12 % 4, rng, 64) for i in range(48)], fps=12)
        expected |= {f.source for f in video.iter_range(path, Fraction(0), None, video.parse_sample_fps(video.DEFAULT_SAMPLE_FPS), 8)}
    episode_ids = [f"E{e}" for e in range(8)] + ["V0", "V1"]
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, os.path.join(REPO, "jobs", "label.py"), "--model", model_dir, "--frames", str(frames_dir),
           "--output", output, "--batch-size", "4"]
    console = tmp_path / "console.txt"
    with open(console, "wb") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    progress = os.path.join(output, "_progress")
    try:
        wait_until(lambda: proc.poll() is not None or (os.path.isdir(progress) and any(n.endswith(".json") for n in os.listdir(progress))),
                   timeout=120, every=0.02)
        assert proc.poll() is None, "the labeling subprocess ended before it could be killed"
    finally:
        _kill_session(proc)
    # What a person saw: the project's lines and its progress bar, none of Ray's internals.
    printed = console.read_text()
    assert "10 to do" in printed, printed
    for internal in ("Started a local Ray instance", "Execution plan", "logging_progress", "streaming_executor", "(MapWorker", "pid="):
        assert internal not in printed, printed
    markers = lambda: sorted(n[: -len(".json")] for n in os.listdir(progress) if n.endswith(".json"))  # noqa: E731
    done = markers()  # (a marker being written when the kill came is a temp file, not a marker)
    committed = len(done)
    assert 1 <= committed < len(episode_ids), f"{committed} episodes were committed when the run was killed"

    # As if killed after an episode's file moved into place but before its marker:
    # a rerun must not keep those rows.
    pending = sorted(set(episode_ids) - set(done))[-1]
    stray = os.path.join(output, f"episode={pending}", "part-0.parquet")
    os.makedirs(os.path.dirname(stray), exist_ok=True)
    shutil.copy(os.path.join(output, f"episode={done[0]}", "part-0.parquet"), stray)
    # ... and as if killed in the middle of writing an errors file and a marker.
    os.makedirs(os.path.join(output, schema.ERRORS_DIR), exist_ok=True)
    half_written = [os.path.join(output, schema.ERRORS_DIR, f"{pending}.parquet.tmp-0123"), os.path.join(progress, f"{pending}.json.tmp-0123")]
    for path in half_written:
        with open(path, "wb") as f:
            f.write(b"PAR1 cut short")

    summary = label(LabelConfig(model_uri=model_dir, frames_uri=str(frames_dir), output_uri=output))
    assert summary["episodes_skipped"] == committed and summary["episodes_labelled"] == len(episode_ids) - committed
    df = read_labels(output)
    assert len(df) == len(expected) and set(df["source"]) == expected  # none twice, none missing
    assert markers() == episode_ids
    assert not any(os.path.exists(p) for p in half_written)
    assert not any(files for _, _, files in os.walk(os.path.join(output, "_tmp")))
    # Shots and pooled answers are the same as those of a run that was never killed.
    whole = str(tmp_path / "uninterrupted")
    label(LabelConfig(model_uri=model_dir, frames_uri=str(frames_dir), output_uri=whole))
    columns = ["source", "shot", "characters", "frame_characters"]
    resumed, uninterrupted = (read_labels(o)[columns].sort_values("source").reset_index(drop=True) for o in (output, whole))
    assert resumed["shot"].max() > 0
    assert resumed.map(lambda v: tuple(v) if isinstance(v, np.ndarray) else v).equals(
        uninterrupted.map(lambda v: tuple(v) if isinstance(v, np.ndarray) else v))


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the job and everything it started (its own local Ray included)."""
    import psutil

    members = [p for p in psutil.process_iter() if _sid(p) == proc.pid]
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in members:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait(timeout=30)


def _sid(p) -> int | None:
    try:
        return os.getsid(p.pid)
    except OSError:
        return None


# -------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: bf16 autocast, channels_last and nvJPEG decoding on GPU")
def test_gpu_labels_agree_with_cpu(local_run, model_dir, tmp_path):
    output = str(tmp_path / "labels")
    summary = label(LabelConfig(model_uri=model_dir, frames_uri=local_run["frames"], output_uri=output, use_gpu=True, fps=25.0))
    assert summary["frames_labelled"] == 36
    gpu = read_labels(output).set_index("source")["label"]
    cpu = read_labels(local_run["output"]).set_index("source")["label"]
    assert (gpu.sort_index() == cpu.sort_index()).mean() >= 0.9
