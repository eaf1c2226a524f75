"""Sampling and best of N on every captioning family besides GIT: each row draws from its own generator, so an
image's sampled caption depends on its seed alone (not its batch-mates, left padding included), in the engine and
through a real worker, where best of N keeps the candidate with the highest CLIPScore."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from common.messages import Curation, GenParams, sample_seed, task_seed
from model.engine import EngineConfig
from model.families import FamilyEngine, candidate_seeds, load_engine
from training import tiny_families

MAX_LENGTH = 12
SAMPLED = GenParams(max_length=MAX_LENGTH, temperature=1.5, top_p=0.95)
#: family -> its tiny builder; ``idefics3-split``, ``smolvlm-split`` and InternVL tile images by aspect ratio, so a
#: batch's rows are left-padded.
BUILDERS: dict[str, Callable[[Path], Path]] = {
    "blip": tiny_families.build_tiny_blip,
    "blip-2": tiny_families.build_tiny_blip2,
    "florence-2": tiny_families.build_tiny_florence2,
    "vision-encoder-decoder": tiny_families.build_tiny_vision_encoder_decoder,
    "llava": tiny_families.build_tiny_llava,
    "idefics3-split": lambda out: tiny_families.build_tiny_idefics3(out, split=True),
    "paligemma": tiny_families.build_tiny_paligemma,
    "qwen2_vl": lambda out: tiny_families.build_tiny_qwen_vl(out, version="2"),
    "qwen2_5_vl": lambda out: tiny_families.build_tiny_qwen_vl(out, version="2.5"),
    "qwen3_vl": lambda out: tiny_families.build_tiny_qwen_vl(out, version="3"),
    "internvl": tiny_families.build_tiny_internvl,
    "smolvlm-split": lambda out: tiny_families.build_tiny_smolvlm(out, split=True),
}
#: Sizes of different aspect ratios: Idefics3 with splitting gives their rows different lengths.
SIZES = [(96, 32), (32, 32), (64, 96), (48, 48), (96, 64), (32, 96)]


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker runs (CAPTIONER_TORCH_THREADS=1): the same sums, the same samples
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family-sampling")
    return {name: build(root / f"tiny-{name}") for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Shape images of six sizes and aspect ratios."""
    from training.synthetic import make_shapes

    folder = tmp_path_factory.mktemp("sampling-shapes")
    paths = []
    for n, ((path, _), size) in enumerate(zip(make_shapes(folder, 6, seed=5, size=48), SIZES, strict=True)):
        paths.append(folder / f"mixed-{n}.png")
        Image.open(path).convert("RGB").resize(size).save(paths[-1])
    return paths


def _load(path: Path) -> FamilyEngine:
    engine = load_engine(EngineConfig(model=str(path), device="cpu", dtype="float32"))
    assert isinstance(engine, FamilyEngine)
    return engine


def _texts(engine: FamilyEngine, images: list[Image.Image], params: GenParams, seeds: list[int] | None) -> list[str]:
    return [g.text for g in engine.generate_detailed(engine.prepare(images), params, seeds)]


# --- the engine ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(BUILDERS))
def test_a_sampled_caption_follows_its_seed_alone(family: str, models: dict[str, Path], mixed: list[Path]) -> None:
    engine = _load(models[family])
    images = [Image.open(p) for p in mixed]
    seeds = [task_seed(7, f"item-{n}") for n in range(len(images))]
    if family in ("idefics3-split", "smolvlm-split", "internvl"):
        batch = engine.family.batch(
            engine.processor, engine.prepare(images), engine.family.prompt(SAMPLED), engine.device, engine.dtype
        )
        assert len(set(batch.inputs["attention_mask"].sum(1).tolist())) > 1, "no row was padded: nothing proven"
    batched = _texts(engine, images, SAMPLED, seeds)
    alone = [_texts(engine, [im], SAMPLED, [seed])[0] for im, seed in zip(images, seeds, strict=True)]
    assert batched == alone  # the same caption alone and among batch-mates
    assert _texts(engine, images[::-1], SAMPLED, seeds[::-1]) == batched[::-1]  # in any order
    assert _texts(engine, images, SAMPLED, seeds) == batched  # the same seed twice: the same captions
    other = _texts(engine, images, SAMPLED, [task_seed(8, f"item-{n}") for n in range(len(images))])
    assert sum(a != b for a, b in zip(other, batched, strict=True)) >= 1, "another seed changed no caption"
    greedy = _texts(engine, images, GenParams(max_length=MAX_LENGTH), None)
    assert sum(a != b for a, b in zip(greedy, batched, strict=True)) >= 1, "sampling gave the greedy captions"
    assert len(set(batched)) > 1


@pytest.mark.parametrize("family", ["blip", "llava"])
def test_best_of_n_candidates_are_reproducible_for_the_seed(
    family: str, models: dict[str, Path], mixed: list[Path]
) -> None:
    engine = _load(models[family])
    image = engine.prepare([Image.open(mixed[0])])
    params = GenParams(max_length=MAX_LENGTH, curation=Curation(score="clip", best_of=4))
    first = engine.sample_detailed(image, params, 4, seed=11, temperature=1.5, top_p=1.0)
    assert engine.sample_detailed(image, params, 4, seed=11, temperature=1.5, top_p=1.0) == first
    assert len({g.text for g in first}) > 1, "four samples alike: nothing for best of N to choose from"
    # Candidate i is the image sampled under its own seed: the same alone, and whatever N.
    one = GenParams(max_length=MAX_LENGTH, temperature=1.5, top_p=1.0)
    assert [g.text for g in first] == [_texts(engine, image, one, [s])[0] for s in candidate_seeds(11, 4)]
    other = engine.sample_detailed(image, params, 4, seed=12, temperature=1.5, top_p=1.0)
    assert [g.text for g in other] != [g.text for g in first]
    for g in first:
        assert 1 < g.tokens <= MAX_LENGTH and (g.ended or g.tokens == MAX_LENGTH)


def test_sampling_takes_one_seed_per_image_and_one_image_per_best_of(
    models: dict[str, Path], mixed: list[Path]
) -> None:
    from common.errors import EngineError

    engine = _load(models["blip"])
    images = engine.prepare([Image.open(p) for p in mixed[:2]])
    with pytest.raises(EngineError, match="1 seeds for 2 images"):
        engine.generate_detailed(images, SAMPLED, [1])
    with pytest.raises(EngineError, match="one image"):
        engine.sample_detailed(images, SAMPLED, 3, seed=1, temperature=1.0, top_p=1.0)


# --- through a real worker -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def llava_env(worker_env: dict[str, str], models: dict[str, Path], tiny_clip: Path) -> dict[str, str]:
    queue = f"family-sampling-{uuid.uuid4().hex[:8]}"
    return {
        **worker_env,
        "CAPTIONER_MODEL": str(models["llava"]),
        "CAPTIONER_CLIP_MODEL": str(tiny_clip),
        "CAPTIONER_CAPTION_QUEUE": queue,
        "CAPTIONER_INTERACTIVE_QUEUE": f"{queue}-now",
    }


@pytest.fixture(scope="module")
def llava_worker(llava_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    from producer.local import WorkerProcess

    proc = WorkerProcess(llava_env, log=tmp_path_factory.mktemp("logs") / "llava-worker.log").start()
    try:
        proc.wait_ready()
        yield
    finally:
        proc.terminate()


@pytest.fixture
def client(llava_env: dict[str, str], llava_worker: None) -> Iterator[object]:
    import redis

    from producer.jobs import JobClient
    from tests.conftest import settings_from

    settings = settings_from(llava_env)
    redis.Redis.from_url(settings.redis_url_str).flushdb()
    c = JobClient(settings)
    yield c
    c.close()


def _run(client: object, refs: list[str], params: GenParams, chunk_size: int = 6) -> dict[str, dict]:
    from producer.jobs import JobClient

    assert isinstance(client, JobClient)
    job = f"family-{uuid.uuid4().hex[:8]}"
    client.enqueue(refs, job_id=job, params=params, chunk_size=chunk_size)
    info = client.wait(job, timeout=240, on_tick=lambda _: None)
    assert info.ok == len(refs), info.as_dict()
    return {row["ref"]: row for row in client.results(job)}


def _worker_images(session_root: Path, n: int, seed: int) -> list[str]:
    from tests.conftest import shape_files

    return shape_files(session_root, "family-sampling", n, seed=seed)


def test_a_sampled_job_on_a_chat_vlm_follows_each_items_seed(
    client: object, session_root: Path, models: dict[str, Path]
) -> None:
    refs = _worker_images(session_root, 6, seed=21)
    params = GenParams(max_length=MAX_LENGTH, temperature=1.5, top_p=0.95, seed=7)
    first = _run(client, refs, params, chunk_size=6)
    again = _run(client, refs, params, chunk_size=1)  # other batches, other messages: a rerun of every item
    assert {r: row["caption"] for r, row in first.items()} == {r: row["caption"] for r, row in again.items()}
    for row in first.values():
        assert row["status"] == "ok" and row["family"] == "llava"
        assert row["params"] | {"max_length": 0} == {
            "max_length": 0,
            "num_beams": 1,
            "temperature": 1.5,
            "top_p": 0.95,
            "seed": 7,
        }
    # Each caption is the engine's draw under the seed derived from the job's seed and the item id.
    engine = _load(models["llava"])
    seeds = [task_seed(7, first[r]["id"]) for r in refs]
    want = _texts(engine, [Image.open(r).convert("RGB") for r in refs], params, seeds)
    assert [first[r]["caption"] for r in refs] == want
    other = _run(client, refs, params.model_copy(update={"seed": 8}))
    assert sum(other[r]["caption"] != first[r]["caption"] for r in refs) >= 1, "another seed changed nothing"


def test_best_of_three_on_a_chat_vlm_keeps_the_highest_scoring_candidate(
    client: object, session_root: Path, models: dict[str, Path], tiny_clip: Path
) -> None:
    from model.curation import ClipScorer

    refs = _worker_images(session_root, 4, seed=22)
    curation = Curation(score="clip", best_of=3, temperature=1.5, top_p=1.0, seed=7)
    params = GenParams(max_length=MAX_LENGTH, curation=curation)
    rows = _run(client, refs, params)
    engine = _load(models["llava"])
    scorer = ClipScorer.load(tiny_clip)
    distinct = 0
    for ref in refs:
        row = rows[ref]
        assert row["status"] == "ok" and row["family"] == "llava"
        assert row["sample_seed"] == sample_seed(7, row["id"]) and len(row["candidates"]) == 3
        assert row["params"]["curation"]["best_of"] == 3
        image = Image.open(ref).convert("RGB")
        samples = engine.sample_detailed(
            engine.prepare([image]), params, 3, seed=row["sample_seed"], temperature=1.5, top_p=1.0
        )
        texts = [s.text for s in samples]
        scores = scorer.scores([image], [texts])[0]
        assert row["candidates"] == pytest.approx(scores, abs=1e-3)
        assert row["caption"] == texts[max(range(3), key=lambda i: scores[i])]
        assert row["clip_score"] == pytest.approx(max(scores), abs=1e-3)
        distinct += len(set(texts)) > 1 and len({round(s, 3) for s in scores}) > 1
    assert distinct, "no image had candidates that differed in text and score: nothing was chosen"
