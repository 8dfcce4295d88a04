"""The GPU check (`shardline bench check`, benchmarks/gpu_check.sh): correctness at real shapes, then
every performance target of one engine, in one process under one time budget. plan.py orders the
steps, runner.py runs them under their caps, environment.py / correctness.py / workloads.py are the
steps, summary.py the table printed last."""
