"""Hand-written accelerator kernels for model building blocks (used by ``optkit.parallel``)."""
