"""Benchmarks (`make bench`): ratios measured in one run, printed as a table and written as JSON.

bench.e2e   mesh (every stage a process on loopback) vs diffusers in-process, interleaved
bench.hops  one gRPC hop carrying an SDXL-size tensor vs a raw-bytes gRPC echo of the same size
bench.run   the entry point: runs both, prints the table, writes --out
"""
