"""Every Redis key and channel name moonq uses, in one place so api and worker cannot drift."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Names under one prefix, so several deployments (or tests) can share a Redis."""

    prefix: str = "moonq"

    def job(self, job_id: str) -> str:
        """Hash: the job record (status, timestamps, request, result, usage, error)."""
        return f"{self.prefix}:job:{job_id}"

    def log(self, job_id: str) -> str:
        """Stream: every event of the job, entry id `0-<seq>`, replayed to late subscribers."""
        return f"{self.prefix}:log:{job_id}"

    def channel(self, job_id: str) -> str:
        """Pub/sub channel on which each event is published live."""
        return f"{self.prefix}:events:{job_id}"

    def tenant_jobs(self, tenant: str) -> str:
        """Sorted set of a tenant's job ids, scored by creation time."""
        return f"{self.prefix}:tenant:{tenant}:jobs"

    def tenant_status_base(self) -> str:
        """What scripts.py's `move_status` builds a status index's name from (+ tenant...)."""
        return f"{self.prefix}:tenant:"

    def tenant_status(self, tenant: str, status: str) -> str:
        """Sorted set: a tenant's jobs in one status, scored by creation time; the scripts
        that change a job's status move it between these (`scripts.MOVE_STATUS`)."""
        return f"{self.tenant_status_base()}{tenant}:status:{status}"

    def tenant_custom_id(self, tenant: str, digest: str) -> str:
        """Sorted set: a tenant's jobs with one `custom_id` (hashed), scored by creation time."""
        return f"{self.prefix}:tenant:{tenant}:custom:{digest}"

    def tenant_batch(self, tenant: str, batch_id: str) -> str:
        """Sorted set: a tenant's jobs of one batch, scored by creation time."""
        return f"{self.prefix}:tenant:{tenant}:batch:{batch_id}"

    def idempotency(self, tenant: str, digest: str) -> str:
        """String: the job created for a tenant's Idempotency-Key (hashed), kept 24 h."""
        return f"{self.prefix}:idem:{tenant}:{digest}"

    def usage(self, tenant: str) -> str:
        """Hash: a tenant's token totals, added once per completed job."""
        return f"{self.prefix}:usage:{tenant}"

    def limit_leases(self) -> str:
        """Sorted set: upstream concurrency permits held, scored by expiry (ms)."""
        return f"{self.prefix}:limit:leases"

    def limit_waiting(self) -> str:
        """Sorted set: workers' requests waiting for a permit, scored by the job's age."""
        return f"{self.prefix}:limit:waiting"

    def limit_seen(self) -> str:
        """Sorted set: when each waiting request last asked (ms); silent ones are dropped."""
        return f"{self.prefix}:limit:seen"

    def limit_asks(self) -> str:
        """Hash: the tokens each waiting request asks for (TPM is served in order too)."""
        return f"{self.prefix}:limit:asks"

    def limit_window(self) -> str:
        """Sorted set: upstream requests of the last 60 s (`lease:tokens`), scored by start."""
        return f"{self.prefix}:limit:window"

    def limit_window_tokens(self) -> str:
        """String: the tokens of every request in the window, kept in step by the limiter."""
        return f"{self.limit_window()}:tokens"
