"""The Redis ledger's key layout: what each key holds. Item ids are stored as 8 bytes (``codec.id_bytes``).

Keys, all under ``<prefix>:job:<id>``:

  (the job)    HASH   kind, name, params, state, created, finished, open, base, n_total, n_ok, n_error,
                      n_cancelled, flag_<name> (captions per quality flag), extra and JSON fields (progress, result,
                      a training run's other fields, the callbacks' marks)
  :src         HASH   item -> reference: the manifest of items without a row (pending or in flight)
  :res         HASH   item -> row (``ledger.redis.rows``): a settled item, its reference moved here from :src
  :pv          HASH   provenance (model version, params, profile) -> its index in rows
  :att         HASH   item -> attempts started; <item>:f finished; <item>:s run alone (while unsettled)
  :err / :flg  SET    items whose row is an error / a caption with quality flags (retry and review find them)
  :rev         HASH   item -> review (correction, mark, reviewer, time, rejection reason, version)
  :rlog        HASH   <item>:<version> -> that review change (JSON): the item's review history
  :ctr         HASH   container -> spec: shards and row groups whose items are not all known yet
  :lock        STRING the training runner holding the job

and ``<prefix>:jobs`` (ZSET of job ids by creation) and ``<prefix>:reuse:<key>`` (HASH image digest -> caption).
An item lives in exactly one of :src and :res, so its reference is stored once.
"""

from __future__ import annotations

from ledger.records import check_job_id

#: A job's keys besides its hash (expiring a job expires them all).
SUFFIXES = ("src", "res", "pv", "att", "err", "flg", "rev", "ctr", "rlog")


class Keys:
    """Key names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def job(self, job_id: str, suffix: str | None = None) -> str:
        """The job's hash, or one of its other keys; the id is checked first (ids name keys)."""
        check_job_id(job_id)
        return self.k("job", job_id) if suffix is None else self.k("job", job_id, suffix)

    def script_keys(self, job_id: str) -> list[str]:
        """The record/seal scripts' KEYS: job, src, res, att, err, flg, ctr."""
        return [self.job(job_id), *(self.job(job_id, s) for s in ("src", "res", "att", "err", "flg", "ctr"))]

    def jobs(self) -> str:
        return self.k("jobs")

    def reuse(self, key: str) -> str:
        return self.k("reuse", key)
