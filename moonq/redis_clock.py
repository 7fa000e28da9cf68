"""Redis's clock, for the scripts that score arq's queue."""

from __future__ import annotations

# Redis's clock in ms, for every score in arq's queue: the hosts of the API and the workers
# may disagree on the time, and a queue scored by one and read by another would hold new jobs
# back (or let retries run early) by the difference.
NOW_MS = """
local redis_time = redis.call('TIME')
local now = tonumber(redis_time[1]) * 1000 + math.floor(tonumber(redis_time[2]) / 1000)
"""
