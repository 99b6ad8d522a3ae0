"""MaskGRPO: the emerge sampler and the ELBO-difference objective."""
