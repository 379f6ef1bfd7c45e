"""How to run a plan: the Dask graph, the tasks, the memory budget and the schedulers."""
