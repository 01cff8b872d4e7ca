"""The hardware profiler: what each block variant costs on a target, predicted or measured.

``devices`` (accelerators, efficiencies and targets as data), ``hardware`` (the known accelerators,
the default target and the parser of target strings), ``deployment`` (the tensor-parallel degree
for a model), ``scenario`` (prefill / decode steps), ``counts`` (FLOPs, bytes, parameters per
variant in closed form), ``roofline`` (time from counts), ``cpu`` (this machine's peaks, measured
once), ``measure`` and ``fit`` (timing variants on the present device and fitting the efficiency
factors), ``table`` (the cost table the MIP reads).
"""
