"""Benchmark harness and profiler: ``bench/throughput.py``, ``bench/trace_summary.py``, ``bench/gpu_check.sh``."""
