"""Registry of pretraining and fine-tuning objectives, chosen by name from `objective.name`."""
