"""Production solvers of the whole-model programs: the sparsity allocation across layers (:mod:`.allocation`,
with the weight spectra it reads, :mod:`.spectra`) and the choice of blocks to remove (:mod:`.depth`)."""
