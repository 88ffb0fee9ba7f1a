"""The admission core: pure functions from a rule set, a caller and a request to the buckets
it is counted in, the models it may be admitted as, and whether an amount fits a bucket.

Nothing here does I/O: the engine, `/v1/simulate`, the dashboard, the stores and the
benchmarks all call these, so a real check and every view of it follow the same rules.
"""
