"""Tools built on the library: the demo, the benchmarks, the ablation and the memory planner.

The library (everything outside this package) never imports from here; the command line dispatches to these.
"""
