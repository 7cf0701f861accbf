"""Attention calibration around sinks: ACT and ZeroTuning, each one intervention reading the shared detector."""
