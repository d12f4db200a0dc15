"""`python -m jobs.benchmark {model,data}`: speed and size figures for BENCHMARKS.md."""
