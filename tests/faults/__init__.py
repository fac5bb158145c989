"""Fault injection: each test breaks one real thing and checks the pipeline stops clearly or
recovers. A package, so its module names cannot clash with tests/ (tests/conftest.py still
applies: pytest collects conftest files by folder)."""
