"""The benchmark suite behind ``fastgradstats bench`` (:mod:`.suite`), its workloads and the optimizer-memory
measurement. Not imported by ``import fastgradstats``: only the CLI and the benchmarks load it."""
