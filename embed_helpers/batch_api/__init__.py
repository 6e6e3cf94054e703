"""OpenAI's Batch API as a hosted mode (EMBED_HOSTED_MODE=batch): half the price, within 24 h."""
from .jobs import Limits, cut_jobs
from .mode import fill_cache, run_plan_batch
from .store import JobStore

__all__ = ["Limits", "cut_jobs", "fill_cache", "run_plan_batch", "JobStore"]
