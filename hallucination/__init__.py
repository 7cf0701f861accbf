"""hallucination: built on vlmtools only."""
