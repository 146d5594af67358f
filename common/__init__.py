"""Leaf modules that data/, model/ and orchestrator/ may all import: they import nothing of lmforge."""
