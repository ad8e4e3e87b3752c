"""Benchmarks of attribution fidelity and data quality (`ddm-ray bench ...`)."""
