"""Benchmark scorers (hallucination and helpfulness) and the comparison table."""
