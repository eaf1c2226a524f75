"""Several captions per image (``--task NAME=PROMPT``) and sampled captions, through a real worker and the tiny GIT:
every task's caption in the rows and in every export format, and sampling reproducible per item."""

from __future__ import annotations

import csv
import json
import tarfile
import uuid
from pathlib import Path

import pytest

from common.messages import CaptionTask, GenParams, ItemResult, ItemStatus, item_id, task_seed
from common.settings import Settings
from exports import read_rows
from ledger import Ledger, codec
from ledger.redis import rows as rowform
from tests.conftest import MAX_LENGTH
from tests.test_cli import invoke

TASKS = ("--task", "short=", "--task", "detailed=a picture of")


@pytest.fixture
def cli_env(worker_env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in worker_env.items() if k.startswith("CAPTIONER_")}


def reference(
    model_dir: Path,
    paths: list[str],
    prompt: str | None,
    *,
    sample: dict | None = None,
    seeds: dict[str, int] | None = None,
) -> dict[str, str]:
    """What the worker must answer, one image at a time, float32, in this process: transformers' own greedy
    generate; or, sampling, the documented procedure token by token on the model's logits (no cache): softmax of
    logits / temperature, the top-p nucleus, one ``torch.rand`` draw from a generator seeded with the caption's
    seed turned into a token through the cumulative probabilities, until the end token or max_length."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, GitForCausalLM

    model = GitForCausalLM.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    tok = processor.tokenizer
    out = {}
    with torch.inference_mode():
        for p in paths:
            pixels = processor(images=Image.open(p).convert("RGB"), return_tensors="pt").pixel_values
            start = [tok.cls_token_id, *(tok(prompt, add_special_tokens=False)["input_ids"] if prompt else [])]
            if sample is None:
                ids = torch.tensor([start])
                kwargs: dict = {"max_length": MAX_LENGTH, "num_beams": 1}
                if prompt:
                    kwargs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
                ids = model.generate(pixel_values=pixels, **kwargs)[0].tolist()
            else:
                assert seeds is not None
                generator, ids = torch.Generator().manual_seed(seeds[p]), list(start)
                while len(ids) < MAX_LENGTH:
                    logits = model(pixel_values=pixels, input_ids=torch.tensor([ids])).logits[0, -1]
                    probs = torch.softmax(logits.float() / sample["temperature"], dim=-1)
                    ordered, order = probs.sort(descending=True)
                    ordered[(ordered.cumsum(0) - ordered) >= sample.get("top_p", 1.0)] = 0.0
                    probs = torch.zeros_like(probs).scatter(0, order, ordered)
                    cdf = probs.double().cumsum(0)
                    u = torch.rand(1, generator=generator, dtype=torch.float64)
                    ids.append(int(torch.searchsorted(cdf, u * cdf[-1], right=True).clamp(max=len(cdf) - 1)))
                    if ids[-1] == tok.sep_token_id:
                        break
            out[p] = processor.batch_decode([ids], skip_special_tokens=True)[0].strip()
    return out


def _members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


@pytest.mark.usefixtures("caption_worker")
def test_two_tasks_caption_every_image_and_every_format_carries_both(
    settings: Settings, cli_env: dict[str, str], images: Path, tiny_model: Path, tmp_path: Path
) -> None:
    code, out, err = invoke(
        settings, "enqueue", str(images), *TASKS, "--chunk-size", "4", "--wait", "--json", env=cli_env
    )
    assert code == 0, err
    job = json.loads(out)["job"]["id"]
    code, out, err = invoke(settings, "export", job, "--format", "jsonl", "-o", "-", env=cli_env)
    rows = {r["ref"]: r for r in map(json.loads, out.splitlines())}
    assert len(rows) == 10 and {r["status"] for r in rows.values()} == {"ok"}
    paths = sorted(rows)
    short, detailed = reference(tiny_model, paths, None), reference(tiny_model, paths, "a picture of")
    for p in paths:
        # Each task's caption is transformers' own greedy caption with that task's prompt; the first is the caption.
        assert rows[p]["captions"] == {"short": short[p], "detailed": detailed[p]}
        assert list(rows[p]["captions"]) == ["short", "detailed"]
        assert rows[p]["caption"] == short[p]
        assert rows[p]["params"]["tasks"] == [{"name": "short"}, {"name": "detailed", "prompt": "a picture of"}]
    assert any(short[p] != detailed[p] for p in paths)  # the prompts reached the model

    for fmt in ("csv", "parquet"):
        target = tmp_path / f"out.{fmt}"
        code, _, err = invoke(settings, "export", job, "--format", fmt, "-o", str(target), env=cli_env)
        assert code == 0, err
        back = {r["ref"]: r for r in read_rows(target, fmt)}
        assert {p: (b["caption_short"], b["caption_detailed"]) for p, b in back.items()} == {
            p: (short[p], detailed[p]) for p in paths
        }, fmt
    with open(tmp_path / "out.csv", newline="") as fh:
        assert next(csv.reader(fh))[-2:] == ["caption_short", "caption_detailed"]

    shards = tmp_path / "shards"
    code, _, err = invoke(settings, "export", job, "--format", "webdataset", "-o", str(shards), env=cli_env)
    assert code == 0, err
    members = _members(shards / "shard-000000.tar")
    for p in paths:
        key = rows[p]["id"]
        assert members[f"{key}.short.txt"].decode() == short[p]
        assert members[f"{key}.detailed.txt"].decode() == detailed[p]
        assert members[f"{key}.txt"].decode() == short[p]

    kohya = tmp_path / "kohya.json"
    code, _, err = invoke(
        settings, "export", job, "--format", "kohya", "--task", "detailed", "-o", str(kohya), env=cli_env
    )
    assert code == 0, err
    assert {k: v["caption"] for k, v in json.loads(kohya.read_text()).items()} == detailed
    code, _, err = invoke(settings, "export", job, "--format", "sidecar", "--task", "detailed", env=cli_env)
    assert code == 0, err
    assert {p: Path(p).with_suffix(".txt").read_text() for p in paths} == {p: detailed[p] + "\n" for p in paths}
    metadata = tmp_path / "metadata.jsonl"
    code, _, err = invoke(
        settings, "export", job, "--format", "metadata", "--task", "short", "-o", str(metadata), env=cli_env
    )
    assert code == 0, err
    assert sorted(json.loads(line)["text"] for line in metadata.read_text().splitlines()) == sorted(short.values())

    # A task the job does not have is one clear line, no traceback.
    code, _, err = invoke(settings, "export", job, "--format", "kohya", "--task", "tags", "-o", "-", env=cli_env)
    assert code == 2 and "no task 'tags'" in err and "Traceback" not in err

    # A retry with other parameters keeps the job's tasks: the captions cut at 12 tokens are made again at 14.
    flagged = {p for p in paths if rows[p].get("flags")}
    code, out, err = invoke(settings, "retry", job, "--flagged", "any", "--max-length", "14", "--json", env=cli_env)
    assert code == 0 and json.loads(out)["requeued"] == len(flagged) > 0, err
    code, _, err = invoke(settings, "wait", job, env=cli_env)
    assert code == 0, err
    _, out, _ = invoke(settings, "export", job, "--format", "jsonl", "-o", "-", env=cli_env)
    again = {r["ref"]: r for r in map(json.loads, out.splitlines()) if r["ref"] in flagged}
    assert {r["params"]["max_length"] for r in again.values()} == {14}
    assert all(list(r["captions"]) == ["short", "detailed"] for r in again.values())


@pytest.mark.usefixtures("caption_worker")
def test_sampled_captions_follow_each_items_seed_whatever_its_batch(
    settings: Settings, cli_env: dict[str, str], images: Path, tiny_model: Path
) -> None:
    sampling = ("--temperature", "1.5", "--top-p", "0.95")

    def run(*args: str) -> dict[str, dict]:
        job = f"sample-{uuid.uuid4().hex[:8]}"
        code, _, err = invoke(settings, "enqueue", str(images), "--job-id", job, *args, "--wait", env=cli_env)
        assert code == 0, err
        _, out, _ = invoke(settings, "export", job, "--format", "jsonl", "-o", "-", env=cli_env)
        return {r["ref"]: r for r in map(json.loads, out.splitlines())}

    # The same seed in chunks of 10 and of 1 (other batches, other messages): the same captions.
    first = run(*sampling, "--seed", "7", "--chunk-size", "10")
    again = run(*sampling, "--seed", "7", "--chunk-size", "1")
    assert {p: r["caption"] for p, r in first.items()} == {p: r["caption"] for p, r in again.items()}
    row = next(iter(first.values()))
    assert row["params"] | {"max_length": 0} == {
        "max_length": 0,
        "num_beams": 1,
        "temperature": 1.5,
        "top_p": 0.95,
        "seed": 7,
    }
    # Each caption is the documented draw on the model's logits, under the seed derived from the job's seed and the
    # item id.
    paths = sorted(first)
    seeds = {p: task_seed(7, first[p]["id"]) for p in paths}
    expected = reference(tiny_model, paths, None, sample={"temperature": 1.5, "top_p": 0.95}, seeds=seeds)
    assert {p: first[p]["caption"] for p in paths} == expected
    other = run(*sampling, "--seed", "8")
    assert sum(other[p]["caption"] != first[p]["caption"] for p in paths) >= 5  # another seed, other captions
    greedy = reference(tiny_model, paths, None)
    assert sum(first[p]["caption"] != greedy[p] for p in paths) >= 5  # sampled, not greedy


def test_task_options_are_checked_before_anything_is_sent(
    settings: Settings, cli_env: dict[str, str], images: Path
) -> None:
    for args, words in [
        (("--task", "short"), "is not NAME=PROMPT"),
        (("--task", "Bad Name=x"), "task name"),
        (("--task", "a=", "--task", "a=x"), "task names must differ"),
        (("--task", "a=x", "--prompt", "y"), "not both"),
        (("--seed", "3"), "--temperature"),
        (("--temperature", "0.7", "--num-beams", "3"), "do not mix"),
    ]:
        code, _, err = invoke(settings, "enqueue", str(images), *args, env=cli_env)
        assert code == 2 and words in err and "Traceback" not in err, (args, err)


def test_the_row_codec_keeps_every_tasks_caption_and_stores_the_names_once() -> None:
    tasks = (CaptionTask(name="short"), CaptionTask(name="detailed", prompt="a picture of"))
    params = GenParams(max_length=20, tasks=tasks)
    row = ItemResult(
        id="0123456789abcdef",
        ref="/data/a.jpg",
        status=ItemStatus.OK,
        caption="a cat",
        captions={"short": "a cat", "detailed": "a picture of a cat on a mat"},
        params=params,
        model_version="v1",
    )
    table = [codec.Provenance("v1", params)]
    stored = rowform.encode(row, base="/data/", created=0.0, provenance=0)
    back = rowform.decode(row.id, stored, base="/data/", created=0.0, provenance=table)
    assert back["caption"] == "a cat" and back["captions"] == row.captions
    assert b"detailed" not in stored  # names live in the job's provenance table, not in every row
    # One task: the caption alone is stored, and the row still names it.
    one = GenParams(tasks=tasks[:1])
    single = row.model_copy(update={"params": one, "captions": {"short": "a cat"}})
    stored_one = rowform.encode(single, base="/data/", created=0.0, provenance=0)
    assert stored_one == rowform.encode(
        single.model_copy(update={"params": None}), base="/data/", created=0.0, provenance=0
    )
    assert rowform.decode(row.id, stored_one, base="/data/", created=0.0, provenance=[codec.Provenance("v1", one)])[
        "captions"
    ] == {"short": "a cat"}
    # Error rows of a job with tasks store no captions; rows of jobs without tasks gain no field.
    error = ItemResult(
        id=row.id, ref=row.ref, status=ItemStatus.ERROR, error_class="decode_error", error="bad", params=params
    )
    assert "captions" not in rowform.decode(
        row.id, rowform.encode(error, base="", created=0.0, provenance=0), base="", created=0.0, provenance=table
    )
    plain = row.model_copy(update={"params": GenParams(), "captions": None})
    assert "captions" not in rowform.decode(
        row.id,
        rowform.encode(plain, base="", created=0.0, provenance=0),
        base="",
        created=0.0,
        provenance=[codec.Provenance("v1", GenParams())],
    )


def test_old_messages_without_tasks_keep_their_params_and_batch_key() -> None:
    from common.messages import ChunkMessage

    msg = ChunkMessage.model_validate({"job_id": "j", "items": ["/a.jpg"], "params": {"max_length": 20}})
    assert msg.params.tasks is None and not msg.params.sampling
    assert msg.params.key() == (20, 1, "")
    assert msg.params.model_dump(exclude_none=True) == {"max_length": 20, "num_beams": 1}
    assert task_seed(7, "abc", "short") == task_seed(7, "abc", "short") != task_seed(7, "abc", "detailed")
    # What a producer sends without tasks or sampling is what it sent before they existed: a worker of an earlier
    # version (unknown fields forbidden) takes it, and the job id derived from it is the one it always was.
    assert GenParams(max_length=20).model_dump() == {"max_length": 20, "num_beams": 1, "prompt": None}
    assert GenParams().model_dump_json() == '{"max_length":50,"num_beams":1,"prompt":null}'


def test_both_ledgers_keep_every_tasks_caption(ledger: Ledger) -> None:
    tasks = (CaptionTask(name="short"), CaptionTask(name="detailed", prompt="a picture of"), CaptionTask(name="tags"))
    params = GenParams(max_length=20, tasks=tasks)
    ledger.open_job("j", "test", params, base="/data/")
    refs = [f"/data/{i}.jpg" for i in range(3)]
    ledger.add_items("j", [(item_id(r), r) for r in refs])
    captions = {"short": "a cat", "detailed": "a picture of a cat", "tags": "cat, mat"}
    ledger.record(
        "j",
        [
            ItemResult(
                id=item_id(refs[0]),
                ref=refs[0],
                status=ItemStatus.OK,
                caption="a cat",
                captions=captions,
                params=params,
                model_version="v1",
            ),
            ItemResult(
                id=item_id(refs[1]),
                ref=refs[1],
                status=ItemStatus.ERROR,
                error_class="decode_error",
                error="x",
                params=params,
                model_version="v1",
            ),
        ],
    )
    rows = {r["ref"]: r for r in ledger.iter_results("j")}
    assert rows[refs[0]]["captions"] == captions and list(rows[refs[0]]["captions"]) == ["short", "detailed", "tags"]
    assert "captions" not in rows[refs[1]]
    assert ledger.item("j", item_id(refs[0]))["captions"] == captions  # type: ignore[index]


@pytest.mark.usefixtures("caption_worker")
def test_a_services_single_call_answers_every_task(settings: Settings, images: Path, tiny_model: Path) -> None:
    from common.messages import TASK_CAPTION_MANY
    from runtime.celery_app import create_app

    paths = sorted(str(p) for p in images.iterdir())[:3]
    params = {"max_length": MAX_LENGTH, "tasks": [{"name": "short"}, {"name": "detailed", "prompt": "a picture of"}]}
    rows = create_app(settings).send_task(TASK_CAPTION_MANY, kwargs={"sources": paths, "params": params}).get(60)
    short, detailed = reference(tiny_model, paths, None), reference(tiny_model, paths, "a picture of")
    assert [r["captions"] for r in rows] == [{"short": short[p], "detailed": detailed[p]} for p in paths]
    assert [r["caption"] for r in rows] == [short[p] for p in paths]
