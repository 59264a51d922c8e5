"""Few-shot pseudo-labels: cached equals naive, multi-label, resume after a kill, shards, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from conftest import TINY_SIZE, synthetic_case, table_lines, to_image

from sslmedsam2.cli import main
from sslmedsam2.fewshot.insertions import insertion_positions
from sslmedsam2.cohort.shards import shard_of
from sslmedsam2.fewshot.similarity import most_similar
from sslmedsam2.fewshot.tracking import VideoFrames
from sslmedsam2.fewshot.volumes import load_volume
from sslmedsam2.frames import IntensitySpec, to_uint8
from sslmedsam2.frames.video import VolumeFrames


def _cohort(root: Path, supports=2, queries=3) -> dict[str, Path]:
    folders = {name: root / name for name in ("si", "sl", "q", "out")}
    for name in ("si", "sl", "q"):
        folders[name].mkdir()
    for i in range(supports):
        image, labels = synthetic_case((12, 48, 48), seed=10 + i)
        sitk.WriteImage(to_image(image), str(folders["si"] / f"support{i}.nii.gz"))
        sitk.WriteImage(to_image(labels), str(folders["sl"] / f"support{i}.nii.gz"))
    for i in range(queries):
        image, _ = synthetic_case((10 + i, 40, 44), seed=20 + i)
        sitk.WriteImage(to_image(image, spacing=(1.0, 1.0, 2.0)), str(folders["q"] / f"query{i}.nii.gz"))
    return folders


def _argv(folders, checkpoint, *extra):
    return ["pseudolabel", "--support-images", str(folders["si"]), "--support-labels", str(folders["sl"]),
            "--query", str(folders["q"]), "-o", str(folders["out"]), "--checkpoint", str(checkpoint),
            "--model", "sam2.1-tiny", "--image-size", str(TINY_SIZE), "--device", "cpu", "--insertions", "2", *extra]


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_cached_equals_naive_and_is_multilabel(tmp_path, tiny_checkpoint):
    folders = _cohort(tmp_path, queries=1)
    assert main(_argv(folders, tiny_checkpoint)) == 0
    naive_out = tmp_path / "naive"
    argv = _argv(folders, tiny_checkpoint, "--naive")
    argv[argv.index(str(folders["out"]))] = str(naive_out)
    assert main(argv) == 0
    for query in ("query0",):
        cached = np.stack([_read(folders["out"] / f"{query}.prob_{label}.nii.gz") for label in (1, 2)])
        naive = np.stack([_read(naive_out / f"{query}.prob_{label}.nii.gz") for label in (1, 2)])
        assert np.abs(cached - naive).max() <= 1e-4
        # the label maps may differ only where a float-rounding difference can flip the decision
        near_tie = (np.abs(naive - 0.5) <= 1e-4).any(axis=0) | (np.abs(naive[0] - naive[1]) <= 1e-4)
        differ = _read(folders["out"] / f"{query}.nii.gz") != _read(naive_out / f"{query}.nii.gz")
        assert near_tie[differ].all() and differ.mean() < 1e-3
        info = json.loads((folders["out"] / f"{query}.case.json").read_text())
        assert info["labels"] == [1, 2] and info["videos"] == 4
        image = sitk.ReadImage(str(folders["q"] / f"{query}.nii.gz"))
        result = sitk.ReadImage(str(folders["out"] / f"{query}.nii.gz"))
        assert result.GetSize() == image.GetSize() and result.GetSpacing() == image.GetSpacing()
        assert set(np.unique(_read(folders["out"] / f"{query}.nii.gz"))) <= {0, 1, 2}
    ranking = table_lines(folders["out"] / "ranking.csv")
    assert ranking[0] == "case_rank,case,case_confidence,slice,label,slice_confidence"


def _memory_layouts(predictor, run) -> Counter:
    """What each query-slice tracking step reads: the positions of its prompt memories and of the tracked outputs
    within SAM2's look-back, relative to the step's frame. A random-weight SAM2 barely depends on its memories,
    so equal numbers alone would not show that batched videos read what naive ones read; equal layouts do.
    Naive videos step through sam2's `_run_single_frame_inference`; batched tracks through `track_step`."""
    from sslmedsam2.fewshot import tracking

    seen: Counter = Counter()

    def note(key, frame, outputs, reverse, num_frames):
        sign = -1 if reverse else 1
        prompts = tuple(sorted(f - frame for f in outputs["cond_frame_outputs"]))
        tracked = tuple(sorted((frame - f) * sign for f in outputs["non_cond_frame_outputs"]
                               if 0 <= f < num_frames and 0 < (frame - f) * sign < predictor.memory_window))
        if key[0] != "support":  # a query slice (named "query" alone, or by its query when batched)
            seen[(key[1], reverse, prompts, tracked)] += 1

    original, original_step = predictor._run_single_frame_inference, tracking.track_step

    def spy(**kw):
        state, frame = kw["inference_state"], kw["frame_idx"]
        if isinstance(state["images"], VideoFrames):
            note(state["images"].source(frame), frame, kw["output_dict"], kw["reverse"], state["num_frames"])
        return original(**kw)

    def step_spy(predictor_, state, steps, tracks=()):
        for track, frame in steps:
            note(track.key(state, frame), frame, track.outputs, track.reverse, track.num_frames or state["num_frames"])
        return original_step(predictor_, state, steps, tracks)

    predictor._run_single_frame_inference, tracking.track_step = spy, step_spy
    try:
        return seen, run()
    finally:
        del predictor._run_single_frame_inference
        tracking.track_step = original_step


def test_batched_videos_equal_naive_videos(tiny_checkpoint):
    """Every insertion of a support tracked as one batch (the query encoded in chunks) reads the same memories
    and gives the same numbers as each video computed naively. Edge cases: support first (k=0), one query slice
    after the support, a support shorter than SAM2's pointer look-back."""
    import torch

    from sslmedsam2.fewshot.tracking import (FeatureStore, SupportMemory, support_masks, track_video_naive,
                                             track_videos_cached)
    from sslmedsam2.models import get_model
    from sslmedsam2.propagation.builder import build_predictor

    predictor = build_predictor(get_model("sam2.1-tiny"), tiny_checkpoint, "cpu", TINY_SIZE)
    support_image, support_labels = synthetic_case((10, 40, 40), seed=3)
    query_image, _ = synthetic_case((9, 36, 44), seed=4)
    support = VolumeFrames(to_uint8(support_image, IntensitySpec()), TINY_SIZE)
    query = VolumeFrames(to_uint8(query_image, IntensitySpec()), TINY_SIZE)
    masks = support_masks(support_labels, 36, 44)
    memory = SupportMemory(predictor, support, masks, [1, 2], len(query) + len(support), 36, 44, FeatureStore())
    ks = [0, 3, 5, 8]
    batched_layout, batched = _memory_layouts(
        predictor, lambda: track_videos_cached(predictor, query, FeatureStore(), memory, ks, encode_chunk=4))
    naive_layout, naive = _memory_layouts(
        predictor, lambda: [track_video_naive(predictor, query, support, masks, [1, 2], k) for k in ks])
    assert batched_layout == naive_layout
    assert sum(naive_layout.values()) == len(ks) * len(query) * 2  # every query slice, each label, once per video
    for ours, reference in zip(batched, naive):
        assert torch.sigmoid(ours.logits).sub(torch.sigmoid(reference.logits)).abs().max() <= 1e-4
        assert ours.presence.sub(reference.presence).abs().max() <= 1e-4


def test_query_batches_are_sized_by_features_and_memory_banks(tiny_checkpoint, monkeypatch):
    """On a GPU a batch holds as many queries as their features and tracks fit in 40 % of the free memory (at most
    8); a support prompted on more slices gives every track a longer memory bank. On a CPU one query per batch."""
    from types import SimpleNamespace

    import torch

    from sslmedsam2.fewshot.engine import BANK_TOKEN_BYTES, FewShotEngine
    from sslmedsam2.propagation.features import frame_feature_bytes
    from sslmedsam2.settings import EngineSettings
    from sslmedsam2.volume.slices import SliceGrid, SliceVolume

    def support(name: str, prompted: int) -> SliceVolume:
        labels = np.zeros((20, 32, 32), np.uint8)
        labels[:prompted, 4:9, 4:9] = 1
        labels[:2, 20:25, 20:25] = 2
        grid = SliceGrid((32, 32, 20), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), "axial", 0)
        return SliceVolume(name, grid, np.zeros((20, 32, 32), np.uint8), labels, Path(name))

    options = SimpleNamespace(engine=EngineSettings(method="sam2", model="sam2.1-tiny", checkpoint=tiny_checkpoint,
                                                    download=False, device="cpu", image_size=TINY_SIZE),
                              naive=False)
    narrow = FewShotEngine(options, [support("a", 3)], [1, 2], log=lambda message: None).track_bytes(50)
    engine = FewShotEngine(options, [support("a", 3), support("b", 15)], [1, 2], log=lambda message: None)
    assert engine.fits([10**12]) and not engine.fits([1, 1])  # CPU
    tokens = (TINY_SIZE // 16) ** 2
    pointer_tokens = engine.predictor.hidden_dim // engine.predictor.mem_dim
    assert engine.track_bytes(50) - narrow == 12 * (tokens + pointer_tokens) * (BANK_TOKEN_BYTES + 4 * tokens)
    assert engine.track_bytes(60) > engine.track_bytes(50)
    cost = engine.query_bytes(50, videos=5)
    assert cost == frame_feature_bytes(TINY_SIZE) * 50 + 5 * 2 * engine.track_bytes(50)

    free = [0]
    monkeypatch.setattr(engine, "device", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 80 * 2**30))
    free[0] = int(3 * cost / 0.4) + 10
    assert engine.fits([cost] * 3) and not engine.fits([cost] * 4)
    assert engine.fits([cost, cost, cost // 2]) and not engine.fits([cost, cost, 2 * cost])
    free[0] = 0
    assert engine.fits([cost])  # one query always goes (running out of memory then splits its videos)
    free[0] = 10**15
    assert engine.fits([cost] * 8) and not engine.fits([cost] * 9)


def test_queries_batched_together_equal_each_query_alone(tmp_path, tiny_checkpoint, monkeypatch):
    """On a GPU several queries share each support's tracking steps (queries of other lengths, k = 0 and the last
    slice included): the same memories are read and the same numbers come out as for each query alone, and the
    command writes the same files."""
    import torch

    import sslmedsam2.fewshot.engine as engine
    from sslmedsam2.fewshot.tracking import (FeatureStore, QueryVideos, SupportMemory, support_masks,
                                             track_queries_cached, track_videos_cached)
    from sslmedsam2.models import get_model
    from sslmedsam2.propagation.builder import build_predictor

    predictor = build_predictor(get_model("sam2.1-tiny"), tiny_checkpoint, "cpu", TINY_SIZE)
    support_image, support_labels = synthetic_case((10, 40, 40), seed=3)
    support = VolumeFrames(to_uint8(support_image, IntensitySpec()), TINY_SIZE)
    queries = [VolumeFrames(to_uint8(synthetic_case((n, 36, 44), seed=4 + n)[0], IntensitySpec()), TINY_SIZE)
               for n in (9, 12)]
    masks = support_masks(support_labels, 36, 44)
    # both videos are longer than SAM2's pointer look-back: one memory serves both queries
    memory = SupportMemory(predictor, support, masks, [1, 2], 9 + len(support), 36, 44, FeatureStore())
    ks = [[0, 5, 9], [3, 12]]
    together_layout, together = _memory_layouts(predictor, lambda: track_queries_cached(
        predictor, [QueryVideos(q, f"q{i}", k) for i, (q, k) in enumerate(zip(queries, ks))], FeatureStore(), memory))
    alone_layout, alone = _memory_layouts(predictor, lambda: [
        track_videos_cached(predictor, q, FeatureStore(), memory, k) for q, k in zip(queries, ks)])
    assert together_layout == alone_layout and sum(alone_layout.values()) == 2 * (9 * 3 + 12 * 2)
    for many, one in zip(together, alone):
        for ours, reference in zip(many, one):
            assert torch.sigmoid(ours.logits).sub(torch.sigmoid(reference.logits)).abs().max() <= 1e-4
            assert ours.presence.sub(reference.presence).abs().max() <= 1e-4

    folders = _cohort(tmp_path, supports=2, queries=3)
    assert main(_argv(folders, tiny_checkpoint)) == 0  # one query at a time (CPU)
    monkeypatch.setattr(engine.FewShotEngine, "fits", lambda self, costs: len(costs) <= 2)
    argv = _argv(folders, tiny_checkpoint)
    argv[argv.index(str(folders["out"]))] = str(tmp_path / "together")
    assert main(argv) == 0
    for query in ("query0", "query1", "query2"):
        for label in (1, 2):
            one = _read(folders["out"] / f"{query}.prob_{label}.nii.gz")
            assert np.abs(_read(tmp_path / "together" / f"{query}.prob_{label}.nii.gz") - one).max() <= 1e-4


def test_out_of_gpu_memory_means_smaller_batches_then_a_clear_error(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    import torch

    import sslmedsam2.fewshot.engine as engine

    folders = _cohort(tmp_path, supports=1, queries=1)
    assert main(_argv(folders, tiny_checkpoint)) == 0
    real = engine.track_queries_cached

    def small_gpu(predictor, videos, store, memory, chunk, on_step):
        if sum(len(v.ks) for v in videos) > 1:
            on_step(1)  # some progress before memory ran out
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(predictor, videos, store, memory, chunk, on_step)

    def no_gpu(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    bars = []

    class Bar:  # what the command line's progress bar is told
        def __init__(self, *args, **kwargs):
            self.done = self.total = 0
            bars.append(self)

        def reset(self, total=None):
            self.done, self.total = 0, total

        def update(self, n=1):
            self.done += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr("sslmedsam2.cli.options.ProgressBar", Bar)
    for name, tracker in (("retry", small_gpu), ("fail", no_gpu)):
        monkeypatch.setattr(engine, "track_queries_cached", tracker)
        argv = _argv(folders, tiny_checkpoint)
        argv[argv.index(str(folders["out"]))] = str(tmp_path / name)
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        if name == "retry":
            assert code == 0 and "now at most 1 video(s) per batch" in err
            assert bars[-1].done == bars[-1].total == 2 * 10  # 2 videos x 10 query slices, none counted twice
            for label in (1, 2):
                ours = _read(tmp_path / name / f"query0.prob_{label}.nii.gz")
                assert np.abs(ours - _read(folders["out"] / f"query0.prob_{label}.nii.gz")).max() <= 1e-4
        else:
            assert code != 0 and "out of GPU memory even for one video" in err
            assert not (tmp_path / name / "query0.nii.gz").exists()


def test_resume_after_kill_gives_the_same_result(tmp_path, tiny_checkpoint):
    folders = _cohort(tmp_path, queries=3)
    reference = tmp_path / "reference"
    argv = _argv(folders, tiny_checkpoint)
    argv[argv.index(str(folders["out"]))] = str(reference)
    assert main(argv) == 0

    code = f"import sys; from sslmedsam2.cli import main; sys.exit(main({_argv(folders, tiny_checkpoint)!r}))"
    job = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (folders["out"] / "query0.nii.gz").exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    first = folders["out"] / "query0.nii.gz"
    assert first.exists(), "the job did not finish its first query in time"
    stamp = first.stat().st_mtime_ns
    # a stale temporary file, as a kill in the middle of a write leaves (named after this host and a dead process)
    from sslmedsam2 import atomic

    (folders["out"] / f".query1.{atomic._HOST}-{job.pid}-abc123.tmp.nii.gz").write_bytes(b"half")
    assert main(_argv(folders, tiny_checkpoint)) == 0
    assert first.stat().st_mtime_ns == stamp, "a finished query was redone"
    assert not list(folders["out"].glob(".*"))
    for query in ("query0", "query1", "query2"):
        np.testing.assert_array_equal(_read(folders["out"] / f"{query}.nii.gz"), _read(reference / f"{query}.nii.gz"))
        np.testing.assert_array_equal(_read(folders["out"] / f"{query}.prob_1.nii.gz"), _read(reference / f"{query}.prob_1.nii.gz"))


def test_a_failed_background_write_stops_the_job_and_the_case_is_redone(tmp_path, tiny_checkpoint, monkeypatch,
                                                                         capsys):
    """A case's files are written while the next query is tracked; a write that fails (a full disk) ends the job
    with its one-line error, the cases written before stay done, and a rerun does the failed one."""
    from sslmedsam2.errors import UserError
    from sslmedsam2.fewshot import job

    from sslmedsam2.fewshot.engine import FewShotEngine

    folders = _cohort(tmp_path, supports=1, queries=3)
    original, calls, events = job.write_case, [], []

    def failing(outdir, query, result, info):
        calls.append(info["query_file"])
        if info["query_file"] == "query1.nii.gz":
            time.sleep(1.0)  # still writing while the next query is tracked
            events.append(("write failed", time.perf_counter()))
            raise UserError(f"cannot write {outdir / 'query1.nii.gz'}: No space left on device")
        original(outdir, query, result, info)

    tracking = FewShotEngine.pseudo_label_many

    def tracked(self, *args, **kwargs):
        events.append(("tracking", time.perf_counter()))
        return tracking(self, *args, **kwargs)

    monkeypatch.setattr(job, "write_case", failing)
    monkeypatch.setattr(FewShotEngine, "pseudo_label_many", tracked)
    assert main(_argv(folders, tiny_checkpoint, "--insertions", "1")) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert (folders["out"] / "query0.nii.gz").exists() and not (folders["out"] / "query1.nii.gz").exists()
    assert calls == ["query0.nii.gz", "query1.nii.gz"]
    assert [name for name, _ in events] == ["tracking", "tracking", "tracking", "write failed"], \
        "the third query was not tracked while the second one's files were written"
    monkeypatch.setattr(job, "write_case", original)
    stamp = (folders["out"] / "query0.nii.gz").stat().st_mtime_ns
    assert main(_argv(folders, tiny_checkpoint, "--insertions", "1")) == 0
    assert (folders["out"] / "query0.nii.gz").stat().st_mtime_ns == stamp
    assert all((folders["out"] / f"query{i}.nii.gz").exists() for i in range(3))


def test_shards_cover_every_query_exactly_once(tmp_path, tiny_checkpoint):
    paths = [Path(f"case{i:02d}.nii.gz") for i in range(11)]
    for count in (1, 2, 3, 4, 11, 12):
        shares = [shard_of(paths, (i, count)) for i in range(1, count + 1)]
        flat = [p for share in shares for p in share]
        assert sorted(flat) == sorted(paths) and len(flat) == len(set(flat))
    folders = _cohort(tmp_path, supports=1, queries=3)
    for shard in ("1/2", "2/2"):
        assert main(_argv(folders, tiny_checkpoint, "--shard", shard, "--insertions", "1")) == 0
    assert sorted(p.name for p in folders["out"].glob("query*.nii.gz") if ".prob" not in p.name
                  and ".uncertainty" not in p.name) == ["query0.nii.gz", "query1.nii.gz", "query2.nii.gz"]
    assert len({line.split(",")[1] for line in table_lines(folders["out"] / "ranking.csv")[1:]}) == 3


def test_insertion_positions_are_distinct_reproducible_and_in_range():
    a = insertion_positions("q", "s", 40, 5, 42)
    assert a == insertion_positions("q", "s", 40, 5, 42) and len(set(a)) == 5 and all(0 <= k < 40 for k in a)
    assert insertion_positions("q", "s", 40, 5, 7) != a
    assert insertion_positions("q", "s", 3, 5, 42) == [0, 1, 2]


def test_similar_supports_are_chosen(tmp_path):
    query, _ = synthetic_case((12, 48, 48), seed=1)
    alike, _ = synthetic_case((12, 48, 48), seed=2)
    inverted = alike.max() - alike
    spec = IntensitySpec()
    chosen = most_similar(to_uint8(query, spec), {"alike": to_uint8(alike, spec), "inverted": to_uint8(inverted, spec)}, 1)
    assert chosen == ["alike"]


def test_support_in_another_orientation_is_reoriented(tmp_path):
    image, labels = synthetic_case((12, 40, 44), seed=3)
    plain = to_image(image)
    sitk.WriteImage(plain, str(tmp_path / "plain.nii.gz"))
    flipped = sitk.Flip(plain, [True, False, True])  # same anatomy, stored with flipped x and z axes
    permuted = sitk.PermuteAxes(flipped, [2, 1, 0])  # and sagittally
    sitk.WriteImage(permuted, str(tmp_path / "permuted.nii.gz"))
    a = load_volume(tmp_path / "plain.nii.gz", "axial", IntensitySpec())
    b = load_volume(tmp_path / "permuted.nii.gz", "axial", IntensitySpec())
    np.testing.assert_array_equal(a.slices, b.slices)
    back = b.to_image(b.slices)
    assert back.GetSize() == permuted.GetSize() and back.GetDirection() == permuted.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), to_uint8(sitk.GetArrayFromImage(permuted), IntensitySpec()))


def _expect(capsys, argv, fragment):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("sslmedsam2: error: ") and fragment in err[-1], err


def test_bad_inputs(tmp_path, tiny_checkpoint, capsys):
    folders = _cohort(tmp_path, supports=2, queries=1)
    # a support whose labels differ from the others': say which
    _, labels = synthetic_case((12, 48, 48), seed=11)
    labels[labels == 2] = 3
    sitk.WriteImage(to_image(labels), str(folders["sl"] / "support1.nii.gz"))
    _expect(capsys, _argv(folders, tiny_checkpoint), "support1")
    # a support without labelled voxel
    sitk.WriteImage(to_image(np.zeros_like(labels)), str(folders["sl"] / "support1.nii.gz"))
    _expect(capsys, _argv(folders, tiny_checkpoint), "no labelled voxel")
    _, labels = synthetic_case((12, 48, 48), seed=11)
    sitk.WriteImage(to_image(labels), str(folders["sl"] / "support1.nii.gz"))
    # an unreadable query
    (folders["q"] / "broken.nii.gz").write_bytes(b"not an image at all")
    _expect(capsys, _argv(folders, tiny_checkpoint), "broken.nii.gz")
    # an empty query folder
    for p in folders["q"].iterdir():
        p.unlink()
    _expect(capsys, _argv(folders, tiny_checkpoint), "holds no image")
    # bad shard, missing label file
    _expect(capsys, _argv(folders, tiny_checkpoint, "--shard", "3/2"), "--shard")
    (folders["sl"] / "support0.nii.gz").unlink()
    _expect(capsys, _argv(folders, tiny_checkpoint), "support0.nii.gz")
    assert not list(folders["out"].glob("*.nii.gz"))
