"""Runner profiles (direct, dask, flink, dataflow) and their launchers."""
