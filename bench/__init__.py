"""AgentVault Mesh benchmarks: `python -m bench` (full) or `python -m bench --quick` (smoke run).

See bench/__main__.py for the options and bench/suite.py for what is measured and how.
"""
