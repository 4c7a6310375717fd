"""How a stage runs: layer specs, partitioning, the stage module, the engine that
executes schedules over point-to-point, ZeRO-1 and checkpoints."""
