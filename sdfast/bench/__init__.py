"""`sdfast bench`: per-stage latency of every backend on one workload, in one fixed schema (llama-bench style)."""
