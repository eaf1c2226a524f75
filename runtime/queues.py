"""What waits in each queue of a Redis broker, counted the way kombu stores it: the figure autoscalers act on.

kombu's Redis transport keeps one queue in several lists: its name (priority step 0, and messages without a
priority) and ``name + SEP + step`` for the other steps (3, 6, 9 by default). A message a worker has taken (prefetched
and not started, or running with a late ack) is in none of them: it sits in the ``unacked`` hash until it is acked.
So a queue's backlog is the sum of its lists (``ready``) plus its entries in that hash (``reserved``), read in one
script so a message moving from a list to the hash is never counted twice or missed between two reads.

Counts messages (chunks of ``CAPTIONER_CHUNK_SIZE`` images for bulk jobs, one call for the interactive queue).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import redis

from common.connections import priority_lists

#: kombu.transport.redis.Channel's default ``unacked_key``; like its ``sep`` and ``priority_steps`` (common.connections)
#: our configuration keeps it, and tests/test_fleet.py checks all three against kombu's own.
UNACKED_KEY = "unacked"

# KEYS: every list of every queue (queue by queue, len(steps) each), then the unacked hash.
# ARGV: the queue names, in the same order. Returns per queue: ready, reserved.
# A reserved entry is kombu's JSON [payload, exchange, routing_key]; our queues are direct with routing key = name.
_COUNT = """
local nq = #ARGV
local steps = (#KEYS - 1) / nq
local out = {}
local index = {}
for q = 1, nq do
  local ready = 0
  for s = 1, steps do ready = ready + redis.call('LLEN', KEYS[(q - 1) * steps + s]) end
  out[2 * q - 1] = ready
  out[2 * q] = 0
  index[ARGV[q]] = q
end
for _, entry in ipairs(redis.call('HVALS', KEYS[#KEYS])) do
  local ok, decoded = pcall(cjson.decode, entry)
  if ok and type(decoded) == 'table' then
    local q = index[decoded[3]]
    if q then out[2 * q] = out[2 * q] + 1 end
  end
end
return out
"""


@dataclass(frozen=True)
class QueueCount:
    """Messages of one queue: ``ready`` in its lists (every priority), ``reserved`` by workers and not yet acked."""

    ready: int
    reserved: int

    @property
    def backlog(self) -> int:
        """Messages not yet done: what a worker fleet has to get through."""
        return self.ready + self.reserved

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "backlog": self.backlog}


def count_queues(
    client: redis.Redis, queues: Iterable[str], *, unacked_key: str = UNACKED_KEY
) -> dict[str, QueueCount]:
    """Ready and reserved messages of each queue, in one atomic read of the broker."""
    names = list(dict.fromkeys(queues))
    if not names:
        return {}
    keys = [key for name in names for key in priority_lists(name)]
    flat: list[Any] = client.eval(_COUNT, len(keys) + 1, *keys, unacked_key, *names)  # type: ignore[no-untyped-call]
    return {name: QueueCount(int(flat[2 * i]), int(flat[2 * i + 1])) for i, name in enumerate(names)}


# KEYS: a queue's lists (every priority step), then the unacked hash (messages workers hold, not yet acked).
# ARGV: needles. Returns the needles found in some message: searched in Redis, so no message body travels.
_FIND = """
local found = {}
local bodies = {}
for k = 1, #KEYS - 1 do
  for _, v in ipairs(redis.call('LRANGE', KEYS[k], 0, -1)) do bodies[#bodies + 1] = v end
end
for _, v in ipairs(redis.call('HVALS', KEYS[#KEYS])) do bodies[#bodies + 1] = v end
for i = 1, #ARGV do
  for _, body in ipairs(bodies) do
    if string.find(body, ARGV[i], 1, true) then found[#found + 1] = ARGV[i]; break end
  end
end
return found
"""


def messages_naming(
    client: redis.Redis, queue: str, needles: Iterable[str], unacked_key: str = UNACKED_KEY
) -> set[str]:
    """The ``needles`` (plain substrings) that some message of ``queue`` contains, waiting at any priority or held
    by a worker; one script, so a message moving from a list to the hash is not missed between two reads."""
    wanted = list(needles)
    if not wanted:
        return set()
    found = client.eval(_FIND, len(priority_lists(queue)) + 1, *priority_lists(queue), unacked_key, *wanted)
    return {f.decode() if isinstance(f, bytes) else f for f in found}


class BacklogCollector:
    """Prometheus collector read at scrape time (no sampler in between): per queue, ready, reserved and backlog, and
    the training jobs running (a fine-tune acks its message when it starts, so no queue shows it while it runs).

    ``read`` returns the counts and the running training jobs (None: unknown, left out).
    """

    def __init__(self, read: Callable[[], tuple[dict[str, QueueCount], int | None]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        counts, running = self.read()
        helps = {
            "ready": "Messages in a queue's lists, every priority.",
            "reserved": "Messages of a queue held by workers, unacked (prefetched or running).",
            "backlog": "Messages of a queue not yet done: ready + reserved.",
        }
        families = {f: GaugeMetricFamily(f"captioner_queue_{f}", text, labels=["queue"]) for f, text in helps.items()}
        for queue, count in counts.items():
            for field, family in families.items():
                family.add_metric([queue], count.as_dict()[field])
        yield from families.values()
        if running is not None:
            yield GaugeMetricFamily(
                "captioner_train_jobs_running", "Training jobs running or waiting to be resumed.", value=running
            )
