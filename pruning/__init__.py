"""pruning: built on vlmtools only."""
