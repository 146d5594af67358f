"""Model definitions and objectives; knows nothing of Ray or the launcher."""
