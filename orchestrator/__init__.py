"""Driver-side orchestration: configs, Ray launch, checkpoints and tracking."""
