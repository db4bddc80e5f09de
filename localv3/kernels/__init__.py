"""localv3's own CPU kernels (C, compiled for this machine on first use): quantised products
with the few activation rows of a decode step, near the memory bandwidth."""
