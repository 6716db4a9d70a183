"""The benchmark harness of issue 3: bench/run.py drives wrk against the service and bench/floor.py."""
