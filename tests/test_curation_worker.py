"""Curation through a real caption worker: a CLIPScore on every ok row equal to ClipScorer's, best of four keeps the
highest-scoring sample, near-duplicates (resized, re-encoded, cropped copies of real photos) captioned once per
group within a job and, with reuse on, across jobs and a worker restart; the index's claim is atomic."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from common.messages import Curation, GenParams
from common.settings import Settings
from model.curation import ClipScorer
from producer.jobs import JobClient
from producer.local import WorkerProcess
from tests.conftest import MAX_LENGTH, redis_url, settings_from
from training.tiny_clip import build_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def clip_env(worker_env: dict[str, str], tiny_clip: Path) -> dict[str, str]:
    queue = f"curation-{uuid.uuid4().hex[:8]}"
    return {
        **worker_env,
        "CAPTIONER_CLIP_MODEL": str(tiny_clip),
        "CAPTIONER_REUSE_CAPTIONS": "true",
        "CAPTIONER_CAPTION_QUEUE": queue,
        "CAPTIONER_INTERACTIVE_QUEUE": f"{queue}-now",
    }


def _start(env: dict[str, str], tmp: Path) -> WorkerProcess:
    proc = WorkerProcess(env, log=tmp / f"worker-{uuid.uuid4().hex[:6]}.log").start()
    try:
        proc.wait_ready()
    except BaseException:
        proc.terminate()
        raise
    return proc


@pytest.fixture
def clip_settings(clip_env: dict[str, str]) -> Settings:
    s = settings_from(clip_env)
    redis.Redis.from_url(s.redis_url_str).flushdb()
    return s


@pytest.fixture
def clip_client(clip_settings: Settings) -> Iterator[JobClient]:
    c = JobClient(clip_settings)
    yield c
    c.close()


@pytest.fixture(scope="module")
def clip_worker(clip_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    proc = _start(clip_env, tmp_path_factory.mktemp("logs"))
    yield proc
    proc.terminate()


def _run(client: JobClient, refs: list[str], curation: Curation, job_id: str) -> dict[str, dict]:
    params = GenParams(max_length=MAX_LENGTH, curation=curation)
    client.enqueue(refs, job_id=job_id, params=params)
    info = client.wait(job_id, timeout=240, on_tick=lambda _: None)
    assert info.ok == len(refs), info.as_dict()
    return {row["ref"]: row for row in client.results(job_id)}


def _shapes(root: Path, n: int, seed: int) -> list[str]:
    from tests.conftest import shape_files

    return shape_files(root, "curate", n, seed=seed)


def test_every_ok_row_has_the_clipscore_of_its_caption(
    clip_worker: WorkerProcess, clip_client: JobClient, session_root: Path, tiny_clip: Path, tmp_path: Path
) -> None:
    refs = _shapes(session_root, 6, seed=11)
    rows = _run(clip_client, refs, Curation(score="clip"), "job-scored")
    scorer = ClipScorer.load(tiny_clip)
    for ref in refs:
        row = rows[ref]
        want = scorer.scores([Image.open(ref).convert("RGB")], [[row["caption"]]])[0][0]
        assert row["clip_score"] == pytest.approx(want, abs=1e-3), row
        assert row["params"]["curation"]["score"] == "clip"
    scores = sorted(r["clip_score"] for r in rows.values())
    floor = scores[len(scores) // 2]  # the upper half passes
    out = tmp_path / "kept.jsonl"
    runner = CliRunner()
    env = {
        "CAPTIONER_REDIS_URL": clip_client.settings.redis_url_str,
        "CAPTIONER_BROKER_URL": clip_client.settings.broker_url_str,
        "CAPTIONER_KEY_PREFIX": clip_client.settings.key_prefix,
    }
    got = runner.invoke(cli, ["export", "job-scored", "-o", str(out), "--min-clip-score", str(floor)], env=env)
    assert got.exit_code == 0, got.output
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["clip_score"] for r in kept) == [s for s in scores if s >= floor]
    status = runner.invoke(cli, ["status", "job-scored", "--json"], env=env)
    summary = json.loads(status.output)["curation"]
    assert summary["scored"] == 6
    assert summary["clip_score"]["min"] == scores[0] and summary["clip_score"]["max"] == scores[-1]


def test_best_of_four_keeps_the_highest_scoring_sample(
    clip_worker: WorkerProcess, clip_client: JobClient, session_root: Path, tiny_clip: Path, tiny_model: Path
) -> None:
    import torch

    from model.engine import CaptionEngine, EngineConfig

    refs = _shapes(session_root, 4, seed=12)
    curation = Curation(score="clip", best_of=4, temperature=1.5, top_p=1.0, seed=7)
    rows = _run(clip_client, refs, curation, "job-best-of")
    torch.set_num_threads(1)  # as the worker runs (CAPTIONER_TORCH_THREADS=1): the same sums, the same samples
    engine = CaptionEngine.load(EngineConfig(model=str(tiny_model), device="cpu", dtype="float32"))
    scorer = ClipScorer.load(tiny_clip)
    params = GenParams(max_length=MAX_LENGTH, curation=curation)
    distinct = 0
    for ref in refs:
        row = rows[ref]
        assert len(row["candidates"]) == 4 and row["sample_seed"] is not None
        image = Image.open(ref).convert("RGB")
        samples = engine.sample_detailed(
            engine.prepare([image]), params, 4, seed=row["sample_seed"], temperature=1.5, top_p=1.0
        )
        texts = [s.text for s in samples]
        scores = scorer.scores([image], [texts])[0]
        assert row["candidates"] == pytest.approx(scores, abs=1e-3)
        assert row["caption"] == texts[max(range(4), key=lambda i: scores[i])]
        assert row["clip_score"] == pytest.approx(max(scores), abs=1e-3)
        distinct += len(set(texts)) > 1
    assert distinct, "sampling gave the same caption four times for every image: nothing was chosen"


def _jpeg(image: Image.Image, path: Path, quality: int = 40) -> str:
    image.save(path, format="JPEG", quality=quality)
    return str(path)


def _photo_copies(folder: Path, names: tuple[str, ...]) -> dict[str, list[str]]:
    """Each photo as PNG plus a half-size, a quality-40 JPEG and a 5%-cropped copy: group name -> its files."""
    from skimage import data

    folder.mkdir(parents=True)
    groups: dict[str, list[str]] = {}
    for name in names:
        photo = Image.fromarray(getattr(data, name)()).convert("RGB")
        w, h = photo.size
        original = folder / f"{name}.png"
        photo.save(original)
        photo.resize((w // 2, h // 2)).save(folder / f"{name}-half.png")
        cropped = photo.crop((w // 40, h // 40, w - w // 40, h - h // 40))
        cropped.save(folder / f"{name}-crop.png")
        groups[name] = [
            str(original),
            str(folder / f"{name}-half.png"),
            _jpeg(photo, folder / f"{name}-q40.jpg"),
            str(folder / f"{name}-crop.png"),
        ]
    return groups


NAMES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def test_near_duplicates_are_captioned_once_per_group_across_jobs_and_restarts(
    clip_env: dict[str, str], clip_worker: WorkerProcess, clip_client: JobClient, session_root: Path, tmp_path: Path
) -> None:
    groups = _photo_copies(session_root / f"photos-{uuid.uuid4().hex[:6]}", NAMES)
    refs = [ref for files in groups.values() for ref in files]
    rows = _run(clip_client, refs, Curation(near_duplicates="phash"), "job-dups")
    for name, files in groups.items():
        reps = [rows[f] for f in files if not rows[f].get("duplicate_of")]
        assert len(reps) == 1, (name, [rows[f] for f in files])  # captioned once
        rep = reps[0]
        for f in files:
            if rows[f] is not rep:
                assert rows[f]["duplicate_of"] == rep["id"]
                assert rows[f].get("caption") in ("", rep["caption"])
    ids = {r["id"]: name for name, files in groups.items() for r in (rows[f] for f in files)}
    for row in rows.values():  # different photos never merged
        if row.get("duplicate_of"):
            assert ids[row["duplicate_of"]] == ids[row["id"]]
    # Every near-duplicate row has its group's caption once exported (copied, or resolved at export).
    out = tmp_path / "dups.jsonl"
    env = {
        "CAPTIONER_REDIS_URL": clip_client.settings.redis_url_str,
        "CAPTIONER_BROKER_URL": clip_client.settings.broker_url_str,
        "CAPTIONER_KEY_PREFIX": clip_client.settings.key_prefix,
    }
    got = CliRunner().invoke(cli, ["export", "job-dups", "-o", str(out)], env=env)
    assert got.exit_code == 0, got.output
    exported = {r["ref"]: r for r in map(json.loads, out.read_text().splitlines())}
    for files in groups.values():
        assert len({exported[f]["caption"] for f in files}) == 1

    # A new worker (the index lives in Redis, not in the process) and a second job of fresh copies: each points at
    # the first job's representative of its photo.
    clip_worker.terminate()
    second = _start(clip_env, tmp_path)
    try:
        folder = session_root / f"again-{uuid.uuid4().hex[:6]}"
        folder.mkdir()
        from skimage import data

        again = {
            name: _jpeg(Image.fromarray(getattr(data, name)()).convert("RGB"), folder / f"{name}.jpg", 70)
            for name in NAMES
        }
        rows2 = _run(clip_client, list(again.values()), Curation(near_duplicates="phash"), "job-dups-2")
    finally:
        second.terminate()
        clip_worker.start().wait_ready()  # the module's worker again, for the tests after this one
    for name, ref in again.items():
        row = rows2[ref]
        rep = next(rows[f] for f in groups[name] if not rows[f].get("duplicate_of"))
        assert row["duplicate_of"] == rep["id"] and row["duplicate_job"] == "job-dups", row
        assert row["caption"] == rep["caption"]


def test_the_index_claims_one_representative_per_group_under_concurrency(clip_settings: Settings) -> None:
    from worker.curation import NearDuplicates, Scorers

    client = redis.Redis.from_url(redis_url(int(clip_settings.redis_url_str.rsplit("/", 1)[1])))
    index = NearDuplicates(client, f"claims-{uuid.uuid4().hex[:6]}", clip_settings, Scorers(clip_settings))
    base = 0x0123_4567_89AB_CDEF
    members = [f"job/{i}" for i in range(16)]
    hashes = [base ^ (1 << (i % 10)) for i in range(16)]  # every pair within 2 bits
    results: dict[str, str] = {}
    gate = threading.Barrier(len(members))

    def claim(member: str, hashed: int) -> None:
        keys = index._keys("job", "phash", 12, hashed, 12)
        gate.wait()
        got = index._claim(keys=keys, args=[member, hashed >> 32, hashed & 0xFFFFFFFF, 12, 600, 4096])
        results[member] = got.decode()

    threads = [threading.Thread(target=claim, args=pair) for pair in zip(members, hashes, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reps = {m for m, rep in results.items() if rep == m}
    assert len(reps) == 1, results
    assert set(results.values()) == reps
    far = base ^ 0xFFFF_0000_FFFF_0000  # 32 bits away: a different picture, a group of its own
    keys = index._keys("job", "phash", 12, far, 12)
    assert index._claim(keys=keys, args=["job/far", far >> 32, far & 0xFFFFFFFF, 12, 600, 4096]) == b"job/far"


def test_curation_options_are_checked_before_anything_is_sent(clip_settings: Settings, images: Path) -> None:
    env = {"CAPTIONER_REDIS_URL": clip_settings.redis_url_str, "CAPTIONER_BROKER_URL": clip_settings.broker_url_str}
    runner = CliRunner()
    for args, hint in ((["--near-duplicates", "phash:99"], "--near-duplicates"), (["--score", "blip"], "--score")):
        got = runner.invoke(cli, ["enqueue", str(images), *args], env=env)
        assert got.exit_code == 2 and hint in got.output and "Traceback" not in got.output, got.output
    assert not redis.Redis.from_url(clip_settings.redis_url_str).keys("*job*")
    # Old messages (no curation) keep their shape: the field is left out when unset.
    assert "curation" not in GenParams().model_dump() and "curation" not in GenParams().model_dump_json()


def test_a_worker_with_a_wrong_clip_model_says_so_at_start(clip_env: dict[str, str], tmp_path: Path) -> None:
    from common.errors import CaptionerError

    env = {
        **clip_env,
        "CAPTIONER_CLIP_MODEL": str(tmp_path / "no-such-clip"),
        "CAPTIONER_CAPTION_QUEUE": f"nothing-{uuid.uuid4().hex[:6]}",
    }
    proc = WorkerProcess(env, log=tmp_path / "bad.log").start()
    try:
        with pytest.raises(CaptionerError, match="worker exited early"):
            proc.wait_ready()
    finally:
        proc.terminate()
    assert "CAPTIONER_CLIP_MODEL" in (tmp_path / "bad.log").read_text()


def test_clip_near_duplicates_group_a_copy_through_the_simhash_index(clip_settings: Settings, tiny_clip: Path) -> None:
    import math

    from skimage import data

    from worker.curation import NearDuplicates, Scorers, clip_bits

    assert clip_bits(1.0) == 0 and clip_bits(0.95) == round(64 * math.acos(0.95) / math.pi) == 6
    photo = Image.fromarray(data.astronaut()).convert("RGB")
    w, h = photo.size
    # A 5% crop: cosine 0.996 on this tiny CLIP, 3 SimHash bits; another photograph: 9 bits.
    images = {
        "a": photo,
        "b": photo.crop((w // 40, h // 40, w - w // 40, h - h // 40)),
        "c": Image.fromarray(data.chelsea()).convert("RGB"),
    }
    client = redis.Redis.from_url(clip_settings.redis_url_str)
    settings = clip_settings.model_copy(update={"clip_model": str(tiny_clip)})
    index = NearDuplicates(client, f"clipnd-{uuid.uuid4().hex[:6]}", settings, Scorers(settings))
    params = GenParams(curation=Curation(near_duplicates="clip:0.95"))
    todo, dups = index.split("job-clip", list(images.items()), params, lambda im: im, "cpu")
    assert [i for i, _ in todo] == ["a", "c"] and [(d.item, d.rep_id) for d in dups] == [("b", "a")]
