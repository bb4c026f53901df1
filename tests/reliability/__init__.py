"""Reliability tests: crashes, faults and load against a real relay process."""
