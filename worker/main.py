"""The arq face: worker settings tuned for LLM jobs, and the job function.

Run with `moonq worker` or `arq worker.main.WorkerSettings`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import logging
import os
import signal
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from arq import Worker
from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.utils import timestamp_ms
from arq.worker import func
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from moonq import logs, scripts
from moonq.batches import BatchStore
from moonq.keys import Keys, queue_leases
from moonq.limits import UpstreamLimiter
from moonq.metrics import Recorder
from moonq.redis import arq_settings, from_settings
from moonq.scheduler import Scheduler, batch_cap, worker_reserve
from moonq.serde import arq_deserialize, arq_serialize
from moonq.settings import Settings, get_settings
from moonq.store import JOB_FUNCTION, JobStore, arq_payload
from worker.jobs import BROKEN_RETRY_DELAY, Runner
from worker.upstream import MoonshotClient
from worker.wake import Wakeup

log = logging.getLogger("moonq.worker")

# arq counts every run (crash re-runs too); moonq counts attempts itself against
# MOONQ_MAX_ATTEMPTS, so arq's own cap only guards against a job looping forever.
ARQ_MAX_TRIES = 1000


HEARTBEAT_DIR = Path(tempfile.gettempdir())
HEARTBEAT_EVERY = 5.0
# The job context's key for the lock token of the worker running it; arq's own runner (a plain
# `Worker`) writes arq's "1".
LOCK_TOKEN = "moonq_lock_token"
# The job context's key for the worker's leases (`MoonqWorker.leases`), which a run's
# `LockKeeper` keeps up to date (through the `LockRenewer`); a poll passes over the worker's
# own jobs whose lease ends within LEASE_MARGIN seconds, or a quarter of the lock's ttl if less
# (their lock may be gone when its script runs; a lease is renewed every ttl/4 to 3/8 of a
# ttl, so it ends 5/8 of a ttl later at the least).
LEASES = "moonq_leases"
LEASE_MARGIN = 1.0
ABORT_MAX_AGE_MS = 60_000
# With no batch line to hand out, a worker asks again after this long (a new batch waits at
# most this long for its first line to start); batches past their window are swept (in the
# background) within EXPIRY_EVERY.
IDLE_FEED_EVERY = 0.25
EXPIRY_EVERY = 2.0


class MoonqWorker(Worker):
    """arq's worker that rides out Redis outages instead of exiting, stops waiting for upstream
    permits on SIGTERM, and leaves a heartbeat file for `moonq worker --check`."""

    def __init__(
        self, *args: Any, lock_timeout: float = 5.0, key_prefix: str = "moonq", **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.keys = Keys(key_prefix)
        self.in_progress_timeout_s = lock_timeout
        self._beat = 0.0
        self._trim_aborts = False
        # arq's lock on a running job says "1", whoever holds it; moonq's says which worker
        # does, so that only the holder renews or releases it (a worker never runs a job twice
        # at once, so the worker is enough to name the run).
        self.lock_token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.ctx[LOCK_TOKEN] = self.lock_token
        self._finish_run: AsyncScript | None = None
        self._lock_script: AsyncScript | None = None
        self._take_script: AsyncScript | None = None
        self._trim_script: AsyncScript | None = None
        self._legacy_moved = False  # `move_legacy_queue`: done once, at the first poll
        # When each running job's lock is known to lapse at the earliest (loop time), as of
        # its take or its keeper's last renewal (`LockKeeper`); a job not in here runs no more.
        self.leases: dict[str, float] = {}
        self.ctx[LEASES] = self.leases
        self._scores: dict[str, int] = {}  # each running job's queue score, as arq was given
        # arq stops by cancelling its main task once; a cancel that lands inside a Redis call
        # can be lost (seen: a SIGTERMed worker that went on polling). Its `on_stop` hook
        # follows every such cancel, so the poll loop also ends on this flag.
        self._stopping = False
        self.on_stop = self._stopped
        self._next_feed = self._next_expiry = self._next_abort_check = 0.0
        self._lines_ended = 0  # the runner's count of ended batch lines, as last seen
        self._sweeping: asyncio.Task[None] | None = None
        # The poll's wait is moonq's: an idle wait that a queued job's wake-up cuts short
        # (arq's own sleep between polls would not be), the poll delay its fallback.
        self._idle, self.poll_delay_s = self.poll_delay_s, 0.0
        self.wakeup = Wakeup(self.pool, self.keys.wake())

    def _stopped(self, signum: signal.Signals) -> None:
        self._stopping = True

    async def _poll_iteration(self) -> None:
        if self._stopping:
            raise asyncio.CancelledError  # ends arq's main loop, as its cancel meant to
        self._heartbeat()
        try:
            if not self._legacy_moved:
                await move_legacy_queue(self.pool, self.keys, self.queue_name)
                self._legacy_moved = True
            later = await self._arq_poll()
            await self._feed_batches()
            idle = self._idle_for(later)
        except (RedisError, OSError) as exc:
            log.warning("Redis unavailable (%s); the worker keeps polling", type(exc).__name__)
            await asyncio.sleep(1.0)
            return
        await self.wakeup.idle(idle)

    async def _arq_poll(self) -> float | None:
        """arq's `_poll_iteration`, with its read of the due jobs, the locks on them and the
        look at the next deferred one made in one round trip (`scripts.TAKE_DUE`) instead of
        three. Returns when that next job falls due (loop time, as of Redis's clock: the
        queue's), or None when there is none, or when no slot is free (then nothing is read)."""
        count = self.queue_read_limit
        if self.burst and self.max_burst_jobs >= 0:
            remaining = self.max_burst_jobs - self._jobs_started()
            if remaining < 1:
                return None
            count = min(remaining, count)
        later = None
        if self.allow_pick_jobs and self.job_counter < self.max_jobs:
            later = await self._take_due(count)
        if self.allow_abort_jobs:
            await self._cancel_aborted_jobs()
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                task.result()  # as arq does: an error of its own run_job surfaces here
        await self.heart_beat()
        return later

    async def _take_due(self, count: int) -> float | None:
        """Lock and start up to a free slot's worth of the due jobs nobody holds."""
        # Only this loop takes slots (running jobs only give them back), so the free ones
        # stay free while the script runs.
        free = self.max_jobs - self.job_counter
        if self._take_script is None:
            self._take_script = self.pool.register_script(scripts.TAKE_DUE)
        taken_at = self.loop.time()
        # This worker's runs whose lock may be gone by the time the script runs: the poll
        # must not lock them (a run that no longer renews could never be taken over).
        soon = taken_at + min(LEASE_MARGIN, self.in_progress_timeout_s / 4)
        late = [job_id for job_id, until in self.leases.items() if until < soon]
        args: list[str | int] = [in_progress_key_prefix, int(self.in_progress_timeout_s * 1000)]
        args += [self.lock_token, count, free, *late]
        keys = [self.queue_name, queue_leases(self.queue_name)]
        found, due_in = await self._take_script(keys=keys, args=args)
        pairs = iter(found)
        for raw, score in zip(pairs, pairs, strict=True):
            job_id = raw.decode()
            running = self.tasks.get(job_id)
            if running is not None and not running.done():
                # Its lock was gone though its keeper renewed it in time (Redis lost it): the
                # lock taken is this worker's, as its keeper would have taken it back.
                continue
            await self.sem.acquire()  # free: never waits
            self.job_counter += 1
            self._start(job_id, int(float(score)), taken_at)
        return None if due_in == b"" else self.loop.time() + int(due_in) / 1000

    def _start(self, job_id: str, score: int, taken_at: float) -> None:
        """Run a job whose lock this worker took at `taken_at` (loop time) or later."""
        self.leases[job_id] = taken_at + self.in_progress_timeout_s
        task = self.loop.create_task(self.run_job(job_id, score))
        task.add_done_callback(lambda _: self._ended(job_id, task))
        self.tasks[job_id] = task

    def _ended(self, job_id: str, task: asyncio.Task[None]) -> None:
        if self.tasks.get(job_id) in (task, None):
            self.leases.pop(job_id, None)
        self._release_sem_dec_counter_on_complete()

    def _idle_for(self, later: float | None) -> float:
        """How long to wait for a wake-up before polling again: the poll delay, or less when a
        deferred job (a retry, due at loop time `later`) falls due sooner, or when batch
        lines may be taken again (see `_feed_batches`), or when its running jobs' abort
        requests are due a look (a cancel's wake-up can be lost: see `_cancel_aborted_jobs`).
        Nothing wakes a worker for those."""
        wait = self._idle
        if self.allow_abort_jobs and self.job_tasks:
            wait = min(wait, max(0.0, self._next_abort_check - time.monotonic()))
        if self.job_counter >= self.max_jobs:
            return wait  # no slot: a finishing job wakes this worker
        feeding = self.ctx.get("moonq_scheduler") is not None and not self._stopping
        if feeding and self.max_jobs - self.job_counter - worker_reserve(self.max_jobs) > 0:
            wait = min(wait, max(0.0, self._next_feed - time.monotonic()))
        if later is None:
            return wait
        return max(0.0, min(wait, later - self.loop.time()))

    async def close(self) -> None:
        """arq's close, which raises when a job task it cancels ends cancelled (a run that
        was finishing its last write): let them end first."""
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        await self.wakeup.close()
        if self._sweeping is not None:
            self._sweeping.cancel()
            await asyncio.gather(self._sweeping, return_exceptions=True)
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.tasks.clear()
        await super().close()

    async def _feed_batches(self) -> None:
        """Take batch lines into the free job slots beyond the reserve kept for interactive
        jobs (arq's own poll has just taken those first); now and then, end the batches whose
        completion window is over. Asks less often while there is nothing to hand out."""
        scheduler: Scheduler | None = self.ctx.get("moonq_scheduler")
        if scheduler is None or self._stopping:
            return
        now = time.monotonic()
        if now >= self._next_expiry and (self._sweeping is None or self._sweeping.done()):
            self._next_expiry = now + EXPIRY_EVERY
            self._sweeping = asyncio.create_task(self._sweep(), name="moonq-batch-sweep")
        runner: Runner | None = self.ctx.get("moonq_runner")
        if runner is not None and runner.batch_lines_ended != self._lines_ended:
            self._lines_ended = runner.batch_lines_ended
            self._next_feed = now  # a line ended: its batch may take another at once
        free = self.max_jobs - self.job_counter - worker_reserve(self.max_jobs)
        if free <= 0 or now < self._next_feed:
            return
        ids = await scheduler.dispatch(free)
        if not ids:
            self._next_feed = now + IDLE_FEED_EVERY
            return
        await self.start_jobs([job_id.encode() for job_id in ids])

    async def _sweep(self) -> None:
        """Batches past their window, or whose creation or cancel was cut short, in the
        background: ending a large batch's lines must not hold up the poll loop."""
        try:
            await self.ctx["moonq_batches"].sweep_due()
        except (RedisError, OSError) as exc:
            log.warning("the batch sweep failed (%s); it runs again", type(exc).__name__)
        except Exception:
            log.exception("the batch sweep failed; it runs again")

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's `start_jobs`, with the lock saying who holds it, and every due job's lock
        taken in one round trip (`scripts.LOCK_DUE`; arq takes them one at a time, a few
        round trips each, which made job starts the ceiling under a burst). Also: a slot
        is given back whatever goes wrong; and a job this worker is still running is not
        started twice, even if its lock lapsed."""
        wanted = []
        for raw_id in job_ids:
            job_id = raw_id.decode()
            running = self.tasks.get(job_id)
            if (running is None or running.done()) and job_id not in wanted:
                wanted.append(job_id)
        wanted = wanted[: max(0, self.max_jobs - self.job_counter)]
        if not wanted:
            return
        for _ in wanted:  # the slots first, so that nothing else can take them meanwhile
            await self.sem.acquire()
        self.job_counter += len(wanted)
        taken: dict[str, int] = {}
        taken_at = self.loop.time()
        try:
            taken = await self._lock_due(wanted)
        finally:
            for _ in range(len(wanted) - len(taken)):  # not started: their slots back
                self.job_counter -= 1
                self.sem.release()
        for job_id, score in taken.items():
            self._start(job_id, score, taken_at)

    async def run_job(self, job_id: str, score: int) -> None:
        """arq's run, with the job's record read beside arq's own first round trip rather
        than after it: a job's start waits one round trip less."""
        runner: Runner | None = self.ctx.get("moonq_runner")
        self._scores[job_id] = score
        try:
            if runner is not None:
                runner.prefetch(job_id)
            await super().run_job(job_id, score)
        except (RedisError, OSError) as exc:
            # arq's reads before the run (its job, its try count) failed, as from a pool kept
            # busy past its timeout: the run never started, and the job runs again once its
            # lock lapses (this task's error would otherwise go unretrieved, a traceback each)
            log.warning("job %s: Redis failed before its run (%s); it runs again", job_id, exc)
        finally:
            self._scores.pop(job_id, None)
            if runner is not None:
                runner.forget(job_id)

    async def _lock_due(self, job_ids: list[str]) -> dict[str, int]:
        """Take arq's lock on the due jobs nobody holds; their queue scores."""
        if self._lock_script is None:
            self._lock_script = self.pool.register_script(scripts.LOCK_DUE)
        args: list[str | int] = [in_progress_key_prefix, int(self.in_progress_timeout_s * 1000)]
        args += [self.lock_token, *job_ids]
        keys = [self.queue_name, queue_leases(self.queue_name)]
        found = await self._lock_script(keys=keys, args=args)
        pairs = iter(found)
        return {raw.decode(): int(float(score)) for raw, score in zip(pairs, pairs, strict=True)}

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        """arq's end of a run (moonq keeps no arq results), by `scripts.FINISH_RUN`: the lock
        is released only if this worker holds it (a superseded run must not unlock the job
        under the run that took it over), and arq forgets the job only once it is over. A job
        to run again after a delay is due that long from now by Redis's clock (the queue's)."""
        due_in = None
        score = self._scores.get(job_id)
        if incr_score and score is not None:
            # arq's increment takes the score to its clock's now + the Retry's delay
            due_in = max(0, incr_score - (timestamp_ms() - score))
        await self._end_run(job_id, "1" if finish else "0", due_in)

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self.wakeup.set()  # a slot is free: a job that waits for one need not wait a poll

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        """arq gives up on a job without running it (its entry expired, or it was tried
        `ARQ_MAX_TRIES` times, or it was aborted before it started): one that is not over
        fails first, so that it is never left behind without anything to run it."""
        runner: Runner | None = self.ctx.get("moonq_runner")
        if runner is not None:
            try:
                await runner.abandon(job_id)
            except (RedisError, OSError):
                # Not failed, so not forgotten: it stays in arq's queue, deferred, and arq
                # gives up on it (and this tries again) once it is due.
                log.exception("job %s: arq gave up on it and it could not be failed", job_id)
                await self._end_run(job_id, "0", int(BROKEN_RETRY_DELAY * 1000))
                return
        await self._end_run(job_id, "force", None)

    async def _end_run(self, job_id: str, outcome: str, due_in: int | None) -> None:
        keys = [in_progress_key_prefix + job_id, job_key_prefix + job_id]
        keys += [retry_key_prefix + job_id, abort_jobs_ss, self.queue_name]
        keys += [self.keys.job(job_id), queue_leases(self.queue_name)]
        args = [self.lock_token, outcome, "" if due_in is None else due_in, job_id]
        if self._finish_run is None:
            self._finish_run = self.pool.register_script(scripts.FINISH_RUN)
        await self._finish_run(keys=keys, args=args)

    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        runner: Runner | None = self.ctx.get("moonq_runner")
        if runner is not None:
            runner.draining = True  # jobs still waiting for an upstream permit go back now
        super().handle_sig_wait_for_completion(signum)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._beat >= HEARTBEAT_EVERY:
            if not self._beat:
                _prune_heartbeats()
                atexit.register(heartbeat_file(os.getpid()).unlink, missing_ok=True)
            self._beat = now
            with contextlib.suppress(OSError):
                heartbeat_file(os.getpid()).touch()
            self._trim_aborts = True

    # What stopped the worker, for its shutdown log when it has no signal handlers of its own
    # (`moonq dev` sets it from the signal its server received).
    stop_reason = "its host process's exit"

    def handle_sig(self, signum: signal.Signals) -> None:
        """arq's `close()` calls this with SIGUSR1 for a worker without signal handlers,
        whatever stopped it: log what did instead."""
        if signum != signal.SIGUSR1 or self._handle_signals:
            super().handle_sig(signum)
            return
        running = [task for task in self.tasks.values() if not task.done()]
        log.info("shutdown on %s ◆ %d jobs to cancel", self.stop_reason, len(running))
        for task in running:
            task.cancel()
        if self.main_task is not None:
            self.main_task.cancel()
        if self.on_stop is not None:
            self.on_stop(signum)

    async def _cancel_aborted_jobs(self) -> None:
        """arq reads its abort requests on every poll (a round trip of 4 commands); moonq's
        cancel wakes the workers with "abort", so they are read only then, and at least once
        per poll delay (a wake-up is at-most-once), and never while no job runs here (one
        that has not started yet sees its abort as it starts, in arq's `run_job`)."""
        now = time.monotonic()
        due = self.wakeup.aborts or now >= self._next_abort_check
        if due and self.job_tasks:
            self.wakeup.aborts = False
            self._next_abort_check = now + self._idle
            await super()._cancel_aborted_jobs()
        if self._trim_aborts:
            # arq means to drop abort requests older than a minute, but its trim removes
            # nothing; one for a job no worker holds any more would stay for ever.
            self._trim_aborts = False
            if self._trim_script is None:
                self._trim_script = self.pool.register_script(scripts.TRIM_ABORTS)
            await self._trim_script(keys=[abort_jobs_ss], args=[ABORT_MAX_AGE_MS])


def heartbeat_file(pid: int) -> Path:
    """Each worker process beats in a file of its own, so no worker can vouch for another."""
    return HEARTBEAT_DIR / f"moonq-worker-{pid}.alive"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # it exists, under another user
    except OSError:
        return False
    return True


def _prune_heartbeats() -> None:
    """Remove the files of workers that died without cleaning up (SIGKILL, OOM)."""
    for path in HEARTBEAT_DIR.glob("moonq-worker-*.alive"):
        pid = path.stem.removeprefix("moonq-worker-")
        if pid.isdigit() and not _running(int(pid)):
            path.unlink(missing_ok=True)


def worker_is_alive(pid: int = 1, max_age: float = 6 * HEARTBEAT_EVERY) -> bool:
    """For healthchecks: the worker process `pid` is running and polled within `max_age` s.

    The default, 1, is the container's main process, which is the worker in moonq's image; on
    a host, pass the worker's PID. A process that died within `max_age` fails at once.
    """
    if not _running(pid):
        return False
    try:
        return time.time() - heartbeat_file(pid).stat().st_mtime < max_age
    except OSError:
        return False


class LockKeeper:
    """Holds arq's lock on one running job for `ttl` seconds at a time, renewed while it runs
    by the process's `LockRenewer`.

    arq locks a job for the longest job timeout + 10 s, so a killed worker's job would wait
    that long to run again; with a short lock kept alive here it runs again within `ttl` (and
    the poll delay, MOONQ_POLL_DELAY, of the worker that takes it). A
    run whose lock lapsed (a stall) takes it back if nobody else took it and the job is still
    its own (`scripts.KEEP_LOCK`), and puts arq's entries back if they are gone, so a job that
    is not over is never left without them.
    """

    def __init__(
        self,
        renewer: LockRenewer,
        job_id: str,
        score: int,
        token: str,
        leases: dict[str, float] | None,
    ) -> None:
        self.renewer, self.job_id, self.score, self.token = renewer, job_id, score, token
        self.payload = arq_payload(job_id, score)
        self.leases = {} if leases is None else leases
        self.attempt = ""
        self.since = asyncio.get_running_loop().time()  # taken, or last asked to renew
        self.stopped = False
        self.context = contextvars.copy_context()  # its job's log fields

    def started(self, attempt: int) -> None:
        """The run started this attempt: from now on, the job is its own only under it."""
        self.attempt = str(attempt)

    async def stop(self) -> None:
        """No more renewals; returns once a renewal of this lock already sent has answered,
        so the run's end (arq's `finish_job`, which may release the lock and put the job
        back) never reaches Redis before it."""
        self.stopped = True
        await self.renewer.forget(self)

    def renewed(self, asked: float, outcome: int) -> None:
        self.since = asked
        if self.stopped:
            return
        if self.job_id in self.leases:  # the worker's run of it still goes on
            # Held (for a ttl from no earlier than `asked`), or not this run's.
            self.leases[self.job_id] = asked + self.renewer.ttl if outcome in (1, 2) else 0.0
        if outcome == 2:  # the renewer warns once for all those of a call
            self.context.run(log.debug, "job %s: its lock had lapsed; taken back", self.job_id)
        elif outcome == -1:
            message = "job %s: another run has it; this one is fenced"
            self.context.run(log.warning, message, self.job_id)


class LockRenewer:
    """The locks of every job a worker process runs, renewed together: each a ttl/4 after it
    was taken or last renewed (most jobs end before their first), all those due in one script
    call a beat (`scripts.KEEP_LOCKS`, up to `BATCH` jobs a call) rather than one call a job,
    which was the busiest Redis traffic of a worker with thousands of long streams (and, its
    pool saturated, made their renewals late enough to lose locks and upstream permits).
    """

    BATCH = 1000

    def __init__(self, redis: ArqRedis, keys: Keys, queue: str, ttl: float) -> None:
        self._keep = redis.register_script(scripts.KEEP_LOCKS)
        self.ttl = ttl
        self._base: list[str | int] = [int(ttl * 1000), in_progress_key_prefix, job_key_prefix]
        self._base += [keys.job(""), queue, queue_leases(queue)]
        self.keepers: dict[LockKeeper, None] = {}
        self._task: asyncio.Task[None] | None = None
        # The keepers of the renewal on its way to Redis, and its answer.
        self._sending: tuple[set[LockKeeper], asyncio.Future[None]] | None = None

    def keep(
        self, job_id: str, score: int, token: str, leases: dict[str, float] | None
    ) -> LockKeeper:
        """Renew this run's lock from now until its keeper stops (call in the job's log
        context: the keeper's lines carry it)."""
        keeper = LockKeeper(self, job_id, score, token, leases)
        self.keepers[keeper] = None
        if self._task is None or self._task.done():
            # A fresh context: the renewer serves every job, not the one that started it.
            self._task = asyncio.create_task(
                self._renew_forever(), name="moonq-lock-renewer", context=contextvars.Context()
            )
        return keeper

    async def forget(self, keeper: LockKeeper) -> None:
        self.keepers.pop(keeper, None)
        sending = self._sending
        if sending is not None and keeper in sending[0]:
            await asyncio.shield(sending[1])

    async def _renew_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while self.keepers:
            await asyncio.sleep(self.ttl / 8)
            now = loop.time()
            due = [k for k in self.keepers if now - k.since >= self.ttl / 4]
            for first in range(0, len(due), self.BATCH):
                # those stopped since the beat began are not renewed (their run has ended)
                batch = [k for k in due[first : first + self.BATCH] if not k.stopped]
                try:
                    await self._renew(batch)
                except Exception:  # never the end of every lock: due again at the next beat
                    log.exception("could not renew the locks of %d jobs", len(batch))

    async def _renew(self, keepers: list[LockKeeper]) -> None:
        if not keepers:
            return
        args: list[str | int | bytes] = [*self._base]
        for k in keepers:
            args += [k.job_id, k.score, k.payload, k.token, k.attempt]
        asked = asyncio.get_running_loop().time()
        answered = asyncio.get_running_loop().create_future()
        self._sending = (set(keepers), answered)
        try:
            outcomes = await self._keep(args=args)
        except (RedisError, OSError) as exc:  # due again at the next beat
            log.warning("could not renew the locks of %d jobs (%s)", len(keepers), exc)
            return
        finally:
            self._sending = None
            answered.set_result(None)
        for keeper, outcome in zip(keepers, outcomes, strict=True):
            if isinstance(outcome, int):
                keeper.renewed(asked, outcome)
            else:  # its own keys are broken: the others' renewals went on
                message = "could not renew the lock of job %s: %s"
                keeper.context.run(log.warning, message, keeper.job_id, outcome)
        taken = sum(1 for outcome in outcomes if outcome == 2)
        if taken:  # one line, not one a job: a loop late under load lets thousands lapse
            log.warning(
                "the locks of %d jobs had lapsed before they were renewed (this process was "
                "late); taken back, nobody else having them",
                taken,
            )

    async def close(self) -> None:
        self.keepers.clear()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)  # the shutdown goes on


async def run_completion(ctx: dict[str, Any], job_id: str) -> str:
    """arq's job function. It returns (and so lets arq forget the job) only when the job is
    over; a run that ends any other way, a run that lost its job to another included, raises
    `Retry` and leaves arq's queue entry for the job's next run (`Runner.run`)."""
    runner: Runner = ctx["moonq_runner"]
    locks: LockRenewer = ctx["moonq_locks"]
    token = ctx.get(LOCK_TOKEN, "1")
    with logs.job_context(job_id):  # the lock keeper's lines name the job too
        keeper = locks.keep(job_id, int(ctx["score"]), token, ctx.get(LEASES))
        try:
            return await runner.run(job_id, token, keeper.started)
        finally:
            await keeper.stop()


LEGACY_QUEUE = "moonq:queue"


async def move_legacy_queue(
    redis: ArqRedis, keys: Keys, queue_name: str, legacy: str = LEGACY_QUEUE
) -> int:
    """Before MOONQ_QUEUE_NAME followed MOONQ_KEY_PREFIX, every deployment queued its jobs in
    `moonq:queue`: a deployment with a prefix of its own has the jobs it queued there moved to
    its own queue (by its workers' first poll), so an upgrade strands none. How many moved."""
    own = f"{keys.prefix}:queue"  # MOONQ_QUEUE_NAME's default now
    if queue_name != own or own == legacy:
        return 0
    move = redis.register_script(scripts.MOVE_QUEUED)
    moved, start = 0, 0
    while True:
        page_moved, looked = await move(keys=[legacy, queue_name], args=[keys.job(""), start, 500])
        moved += int(page_moved)
        start += int(looked) - int(page_moved)  # those moved left the ranks behind them
        if int(looked) < 500:
            break
    if moved:
        log.warning("moved %d jobs of this deployment from %s to %s", moved, legacy, own)
    return moved


def worker_kwargs(
    settings: Settings,
    *,
    redis: ArqRedis | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, Any]:
    """Everything `arq.Worker` takes; `redis` and `transport` are injected by dev mode and tests.

    arq polls, locks and finishes jobs through the same bounded pool as moonq's own commands,
    so a worker never opens more than MOONQ_REDIS_MAX_CONNECTIONS (arq would otherwise open a
    pool of its own, unbounded); arq closes it when the worker closes.
    """
    client = redis or from_settings(settings)

    async def startup(ctx: dict[str, Any]) -> None:
        store = JobStore.from_settings(client, settings)
        upstream = MoonshotClient.from_settings(settings, transport)
        limiter = UpstreamLimiter(
            client,
            store.keys,
            concurrency=settings.upstream_concurrency,
            rpm=settings.upstream_rpm,
            tpm=settings.upstream_tpm,
            lease_ttl=settings.lock_timeout,
        )
        recorder = Recorder(client, store.keys)
        ctx["moonq_runner"] = Runner(store, upstream, limiter, settings, recorder=recorder)
        ctx["moonq_locks"] = LockRenewer(
            client, store.keys, settings.queue_name, settings.lock_timeout
        )
        ctx["moonq_metrics"] = asyncio.create_task(recorder.run(), name="moonq-metrics")
        ctx["moonq_batches"] = BatchStore(store)
        ctx["moonq_scheduler"] = Scheduler(
            client, store.keys, settings.queue_name, cap=batch_cap(settings)
        )
        if LOCK_TOKEN not in ctx:
            log.warning(
                "arq's own runner: its locks do not name their holder, so a worker that stalls "
                "past MOONQ_LOCK_TIMEOUT can make a job run more often; `moonq worker` avoids it"
            )
        if settings.moonshot_api_key is None:
            log.warning("MOONSHOT_API_KEY is not set: upstream calls carry no key")
        log.info(
            "moonq worker: upstream %s, concurrency %d",
            settings.moonshot_base_url,
            settings.worker_concurrency,
        )

    async def shutdown(ctx: dict[str, Any]) -> None:
        flushing: asyncio.Task[None] | None = ctx.get("moonq_metrics")
        if flushing is not None:
            flushing.cancel()
            await asyncio.gather(flushing, return_exceptions=True)
        locks: LockRenewer | None = ctx.get("moonq_locks")
        if locks is not None:
            await locks.close()
        runner: Runner | None = ctx.get("moonq_runner")
        if runner is not None:
            await runner.events.close()  # its jobs are over or handed back by now
            await runner.metrics.close()  # the last numbers, and its jobs in flight gone
            await runner.client.aclose()
            await runner.limiter.close()

    return {
        "functions": [func(run_completion, name=JOB_FUNCTION, max_tries=ARQ_MAX_TRIES)],
        "queue_name": settings.queue_name,
        "redis_settings": arq_settings(settings),
        "redis_pool": client,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "max_jobs": settings.worker_concurrency,
        # moonq bounds each attempt's stream itself (MOONQ_JOB_TIMEOUT) and records why; arq's
        # timeout would also count the wait for an upstream permit, then drop the job.
        "job_timeout": None,
        # moonq keeps results itself; arq's copy would only hold failures' reprs.
        "keep_result": 0,
        "poll_delay": settings.poll_delay,
        "max_tries": ARQ_MAX_TRIES,
        "job_serializer": arq_serialize,
        "job_deserializer": arq_deserialize,
        "health_check_interval": 10,
        # SIGTERM: stop taking jobs, let running ones finish for the grace period, then
        # cancel the rest, which go back to the queue.
        "job_completion_wait": settings.shutdown_grace,
        "allow_abort_jobs": True,
        "lock_timeout": settings.lock_timeout,
        "key_prefix": settings.key_prefix,
    }


def create_worker(settings: Settings, **overrides: Any) -> MoonqWorker:
    injected = {k: overrides.pop(k) for k in ("redis", "transport") if k in overrides}
    return MoonqWorker(**{**worker_kwargs(settings, **injected), **overrides})


def __getattr__(name: str) -> Any:
    """`WorkerSettings`, for `arq worker.main.WorkerSettings`: built from the environment when
    asked for, so importing this module reads no settings."""
    if name == "WorkerSettings":
        return worker_kwargs(get_settings())  # arq's runner drops `lock_timeout`
    raise AttributeError(name)
