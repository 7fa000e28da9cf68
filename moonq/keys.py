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

    def file_base(self) -> str:
        """What file_quota's scripts build a file's record name from (+ file id)."""
        return f"{self.prefix}:file:"

    def file(self, file_id: str) -> str:
        """Hash: an uploaded file's record (its tenant and its OpenAI file object)."""
        return f"{self.file_base()}{file_id}"

    def file_data(self, file_id: str) -> str:
        """String: an uploaded file's bytes, APPENDed in pieces as the upload streams in."""
        return f"{self.prefix}:file:{file_id}:data"

    def tenant_files(self, tenant: str) -> str:
        """Sorted set of a tenant's file ids, scored by creation time."""
        return f"{self.prefix}:tenant:{tenant}:files"

    def tenant_file_sizes(self, tenant: str) -> str:
        """Hash: a tenant's file ids -> their bytes (its quota: MOONQ_TENANT_MAX_FILE*)."""
        return f"{self.prefix}:tenant:{tenant}:file-sizes"

    def tenant_file_sweep(self, tenant: str) -> str:
        """String: the rank in a tenant's file index where the next look for expired files
        starts (moonq/file_quota.py); kept a day."""
        return f"{self.prefix}:tenant:{tenant}:file-sweep"

    def extract_owner(self, upstream_id: str) -> str:
        """String: the tenant that uploaded an upstream `file-extract` file (proxied)."""
        return f"{self.prefix}:extract:{upstream_id}"

    def upstream_models(self) -> str:
        """String: the upstream's model list (JSON, with when it was fetched), shared by every
        API process; kept stale while the upstream is unreachable."""
        return f"{self.prefix}:upstream:models"

    def upstream_models_refresh(self) -> str:
        """String: held (SET NX PX) by the one API process refreshing the model list."""
        return f"{self.prefix}:upstream:models:refresh"

    def usage(self, tenant: str, day: str) -> str:
        """Hash: a tenant's usage on one UTC day (YYYY-MM-DD), `model|count` -> amount, added
        once per completed job; kept MOONQ_USAGE_RETENTION_DAYS, beyond the jobs themselves."""
        return f"{self.prefix}:usage:{tenant}:{day}"

    def wake(self) -> str:
        """Pub/sub channel: a job was queued (CREATE publishes); idle workers poll at once."""
        return f"{self.prefix}:wake"

    def budget_hold_base(self) -> str:
        """What FINISH builds a tenant's holds' names from (+ tenant + `:hold:` + period)."""
        return f"{self.prefix}:budget:"

    def budget_hold(self, tenant: str, period: str) -> str:
        """Hash: `tokens` and `nanos` (cost) a tenant's accepted, unfinished work holds against
        its budgets of a day (YYYY-MM-DD) or a month (YYYY-MM); moonq/budgets.py."""
        return f"{self.budget_hold_base()}{tenant}:hold:{period}"

    def budget_requests(self, tenant: str, minute: int) -> str:
        """String: a tenant's requests in one clock minute (a budget's request rate)."""
        return f"{self.prefix}:budget:{tenant}:rpm:{minute}"

    def batch_base(self) -> str:
        """What scripts build a batch's key names from (+ batch id [+ suffix])."""
        return f"{self.prefix}:batch:"

    def batch(self, batch_id: str) -> str:
        """Hash: the batch record (status, input file, counts, usage, timestamps)."""
        return f"{self.batch_base()}{batch_id}"

    def batch_lines(self, batch_id: str) -> str:
        """List: the batch's job ids in the input file's line order (its output's order)."""
        return f"{self.batch(batch_id)}:lines"

    def batch_pending(self, batch_id: str) -> str:
        """List: the batch's job ids not yet handed to the workers, in line order."""
        return f"{self.batch(batch_id)}:pending"

    def batch_log(self, batch_id: str) -> str:
        """Stream: the batch's progress events (`line` per finished line, then `done`)."""
        return f"{self.batch(batch_id)}:log"

    def batch_channel(self, batch_id: str) -> str:
        """Pub/sub channel on which each progress event is published live."""
        return f"{self.batch_base()}events:{batch_id}"

    def tenant_batches(self, tenant: str) -> str:
        """Sorted set: a tenant's batch ids, scored by creation time."""
        return f"{self.prefix}:tenant:{tenant}:batches"

    def batches_expiring(self) -> str:
        """Sorted set: running batches scored by when their completion window ends."""
        return f"{self.batch_base()}expiring"

    def sched_base(self) -> str:
        """What the scheduler's scripts build a tenant's line of batches from (+ tenant)."""
        return f"{self.prefix}:sched:tenant:"

    def sched_tenant(self, tenant: str) -> str:
        """List: a tenant's batches with lines still to hand out, oldest first."""
        return f"{self.sched_base()}{tenant}"

    def sched_active(self) -> str:
        """Sorted set: tenants with batch lines to hand out, scored by virtual time."""
        return f"{self.prefix}:sched:active"

    def sched_vtime(self) -> str:
        """Hash: each tenant's virtual time (tokens charged), kept while it is idle."""
        return f"{self.prefix}:sched:vtime"

    def sched_clock(self) -> str:
        """String: the virtual time of the latest line handed out (a new tenant starts here)."""
        return f"{self.prefix}:sched:clock"

    def sched_inflight(self) -> str:
        """Sorted set: batch lines handed to the workers and not yet over, by hand-out time."""
        return f"{self.prefix}:sched:inflight"

    def limit_leases(self) -> str:
        """Sorted set: upstream concurrency permits held, scored by expiry (ms)."""
        return f"{self.prefix}:limit:leases"

    def limit_waiting(self) -> str:
        """Sorted set: workers' requests waiting for a permit, scored by their place in line
        (interactive jobs' turns in fair order across tenants, then batch lines' by age)."""
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

    def account(self) -> str:
        """Hash: the upstream account's pause (out of balance): `paused` (the reason),
        `paused_since`, `next_check` (Unix s), `checks`, `probe` ('1': its balance reads
        positive, so only a probe request can tell); absent while it is not paused."""
        return f"{self.prefix}:account"

    def metrics(self) -> str:
        """Hash: the workers' counters and histogram buckets (`moonq.metrics`), one field per
        sample, added to in one transaction per flush; read by every API's `/metrics`."""
        return f"{self.prefix}:metrics"

    def metrics_models(self) -> str:
        """Set: the models metrics are recorded by (capped; the rest are "other")."""
        return f"{self.prefix}:metrics:models"

    def metrics_workers(self) -> str:
        """Hash: each live worker's jobs in flight and when it said so ("n unix-s")."""
        return f"{self.prefix}:metrics:workers"

    def metrics_slot(self, slot: int) -> str:
        """Hash: what the workers saw end in one `moonq.timeline` step (jobs, tokens, time to
        first token, by tenant), for the dashboard's charts; expires after the charts' span."""
        return f"{self.prefix}:metrics:slot:{slot}"

    def account_check(self) -> str:
        """String: held (SET NX PX) by the one worker checking a paused account's balance."""
        return f"{self.prefix}:account:check"


def queue_leases(queue_name: str) -> str:
    """Sorted set beside arq's queue: the jobs workers hold, scored by when each one's lock
    lapses at the earliest (Redis's clock, ms). A held job's queue entry is moved down by
    `scripts.HELD` (out of the ranges a poll reads); a poll puts one whose lock lapsed back in
    its place (`scripts.TAKE_DUE`)."""
    return f"{queue_name}:leases"


def queue_fair(queue_name: str) -> str:
    """Hash beside arq's queue: each tenant's next turn (`scripts.CREATE`), which orders
    interactive jobs across tenants."""
    return f"{queue_name}:fair"


def queue_fair_waiting(queue_name: str, tenant: str) -> str:
    """Sorted set beside arq's queue: a tenant's interactive jobs that have not ended (their
    record keys, by turn); those with turns past `queue_fair_clock` are its jobs that wait,
    whose latest `scripts.CREATE` follows. Marked as in use by the member '' (at -inf); the
    member '~' holds the tenant's last turn given while jobs the set lacks may wait."""
    return f"{queue_name}:fair:waiting:{tenant}"


def queue_fair_clock(queue_name: str) -> str:
    """String beside arq's queue: the latest turn of an interactive job whose attempt started
    (`scripts.START`); a job queued now takes its turn no earlier."""
    return f"{queue_name}:fair:clock"
