"""Metrics (one module declares them all) and logging set-up."""
