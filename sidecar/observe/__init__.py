"""What the sidecar watches: the trainer's log and progress bar, its output files, its
processes and the GPU."""
