"""Benchmarks (`make bench`): ratios measured in one run, printed as a table and written as JSON.

bench.run    the entry point: runs both parts, prints the table, writes --out
bench.e2e    the mesh (every stage a process on loopback) vs diffusers in-process, interleaved
bench.hops   one gRPC hop carrying an SDXL-size tensor vs a raw-bytes gRPC echo of the same size,
             plus what-if variants (in-place codec, one-copy wire encoding, glibc malloc tuning)
bench.wire   the one-copy / zero-copy wire encoding used by the `zero_copy` what-if
bench.faces  face detailing: batched vs one face per call (faces/s), face analysis latency
bench.stats  percentiles, machine description, the table
"""
