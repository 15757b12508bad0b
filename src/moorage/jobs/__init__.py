"""Async jobs below the edges: job rows in the catalog (`store`) and the delivery of a finished
job to its callback URL (`callbacks`, which needs the ``serve`` extra: httpx and tenacity).

The HTTP routes and the runner that takes jobs from their queue are edges (``server/``,
``streams/``); they use these modules and keep no job state of their own.
"""

from .store import CALLBACK_PENDING, Job, JobError, JobNotFound, JobStatus, JobStore, new_job_id, new_runner_id

__all__ = [
    "CALLBACK_PENDING",
    "Job",
    "JobError",
    "JobNotFound",
    "JobStatus",
    "JobStore",
    "new_job_id",
    "new_runner_id",
]
