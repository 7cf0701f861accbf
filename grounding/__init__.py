"""grounding: built on vlmtools only."""
