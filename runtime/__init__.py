"""Everything with side effects that stages use: engines, sandbox, models, checkpoints, table I/O, devices, progress, environment."""
