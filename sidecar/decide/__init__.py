"""Pure decisions: is the run healthy, how long may it pause. No I/O; the clock is passed in."""
