"""How the scripts score arq's queue: by Redis's clock, in bands."""

from __future__ import annotations

# Redis's clock in ms, for every score in arq's queue: the hosts of the API and the workers
# may disagree on the time, and a queue scored by one and read by another would hold new jobs
# back (or let retries run early) by the difference.
NOW_MS = """
local redis_time = redis.call('TIME')
local now = tonumber(redis_time[1]) * 1000 + math.floor(tonumber(redis_time[2]) / 1000)
"""

# The scores of arq's queue fall in three bands:
# - below FAIR_TOP: jobs in fair order. An interactive job's score is its turn (start-time
#   fair queuing, a turn per job, from 1: arq's own runner passes over a job scored 0): its
#   tenant's next turn, or the latest turn whose attempt started, whichever is later
#   (`scripts.CREATE`). A tenant's jobs run in the order it queued them, and one of a tenant
#   that queues one now goes right after the jobs that started, however many another tenant
#   has queued: tenants' jobs alternate, and idling earns no credit. The turn is the job's
#   place at the upstream limiter too, so a job put back (its worker died, stopped or
#   stalled) keeps it there and here. Batch lines, which DISPATCH hands to a worker that takes
#   them at once, are scored LINES: one handed back goes after every interactive job. Always
#   due (far below any time in ms).
# - from FAIR_TOP: jobs due at a time, in ms by Redis's clock: retries, hand-backs with a
#   delay, entries queued before fair order. A poll takes those due before the others.
# - below 0: jobs a worker holds, their score less HELD (`scripts.TAKE_DUE`).
FAIR_TOP = 10**12
LINES = FAIR_TOP - 1
HELD = 10**13
