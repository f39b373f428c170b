"""Acting on a verdict: choose where to resume, point the launch at it, restart the trainer."""
