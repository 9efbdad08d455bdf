"""The training loop's state and process plumbing: process groups and sharding, checkpoints, stop
signals, fault injection, uneven-rank padding, run logs and file names, the learning-rate
schedule, and the shared job entry point."""
